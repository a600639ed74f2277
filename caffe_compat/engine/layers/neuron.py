"""Element-wise ("neuron") layers: ReLU, PReLU, Sigmoid, TanH, AbsVal, Power, Exp, Log,
BNLL, ELU, Dropout, Threshold, Clip, Swish, and the forks' ReLU6.

Every layer here keeps the bottom's shape (the base ``top_shapes``) and never writes into
its bottom: the builder implements Caffe's in-place tops by rebinding names, so an
in-place ``ReLU`` must still return a fresh tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from caffe_compat.engine.fillers import fill
from caffe_compat.engine.layers.base import TRAIN, Layer, Shape, register
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.layers import fast_forms


def _constant_filler(value: float):
    """A ``FillerParameter`` for Caffe's ``constant`` filler with this value."""
    return caffe_pb2.FillerParameter(type="constant", value=value)


class _Neuron(Layer):
    """Base of the neuron layers: one bottom, one top of the same shape."""

    num_bottoms = (1, 1)
    num_tops = (1, 1)
    keeps_coords = True


@register
class ReLU(_Neuron):
    """``y = max(x, 0) + negative_slope * min(x, 0)``.

    Caffe's gradient is ``dy * ((x > 0) + slope * (x <= 0))``: the slope side owns x == 0.
    ``F.relu`` (slope 0: grad 0 at 0) and ``F.leaky_relu`` (grad ``slope`` at 0) both agree.
    """

    type = "ReLU"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.negative_slope = float(param.relu_param.negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.negative_slope == 0.0:
            return F.relu(x)
        return F.leaky_relu(x, self.negative_slope)

    def rectifier_slope(self) -> float | None:
        return self.negative_slope


@register
class PReLU(_Neuron):
    """ReLU with learned negative slopes, one per channel (axis 1) or one shared.

    Blob 0 holds the slopes: shape ``[C]``, or ``[]`` (a scalar) when ``channel_shared``.
    Default filler: constant 0.25. ``F.prelu``'s gradients equal Caffe's:
    ``dx = dy * (x > 0 ? 1 : a)`` and ``da = sum(dy * x * (x <= 0))``.
    """

    type = "PReLU"
    specialized = fast_forms.prelu      # a batch-1 forward without per-call work

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.prelu_param
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise self.error(f"bottom must have at least 2 axes (N, C, ...), got shape {list(shape)}")
        self.channel_shared = bool(p.channel_shared)
        blob_shape: Shape = () if self.channel_shared else (shape[1],)
        filler = p.filler if p.HasField("filler") else _constant_filler(0.25)
        self.add_blob(fill(filler, blob_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.blobs[0]
        # F.prelu wants a 1-D weight of size 1 or C, applied along axis 1.
        return F.prelu(x, slope.reshape(-1).to(x.dtype))


@register
class Sigmoid(_Neuron):
    """``y = 1 / (1 + exp(-x))``; gradient ``dy * y * (1 - y)`` as in Caffe."""

    type = "Sigmoid"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@register
class TanH(_Neuron):
    """``y = tanh(x)``; gradient ``dy * (1 - y^2)`` as in Caffe."""

    type = "TanH"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


@register
class AbsVal(_Neuron):
    """``y = |x|``; gradient ``dy * sign(x)`` (0 at x == 0), which is torch's too."""

    type = "AbsVal"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        if len(param.top) and len(param.bottom) and param.top[0] == param.bottom[0]:
            # Caffe's backward needs the original x (sign), so it refuses in-place use.
            raise self.error(f"AbsVal cannot run in place (top '{param.top[0]}' == bottom); "
                             "give the top its own name")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


@register
class Power(_Neuron):
    """``y = (shift + scale * x) ^ power`` (defaults power 1, scale 1, shift 0).

    Caffe special cases: when ``scale * power == 0`` the output is the constant
    ``shift ^ power`` (1 when power == 0) with a zero gradient; power == 1 skips the pow.
    Elsewhere the gradient is autograd's ``power * scale * u^(power-1)``. Caffe computes it
    as ``power * y / x`` (or ``diff_scale * y / u``), which is the same except at u == 0,
    where Caffe yields 0/0 = NaN and we give the true derivative.
    """

    type = "Power"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.power * self.scale == 0.0:
            value = 1.0 if self.power == 0.0 else self.shift ** self.power
            # torch.where keeps the top connected to x with an exactly-zero gradient,
            # whatever x holds (x * 0 would turn inf into NaN).
            return torch.where(torch.zeros_like(x, dtype=torch.bool), x,
                               torch.full_like(x, value))
        u = x
        if self.scale != 1.0:
            u = u * self.scale
        if self.shift != 0.0:
            u = u + self.shift
        return u if self.power == 1.0 else torch.pow(u, self.power)


def _check_base(layer: Layer, base: float) -> None:
    if base != -1.0 and not base > 0.0:
        raise layer.error(f"base ({base:g}) must be strictly positive, or -1 for base e")


@register
class Exp(_Neuron):
    """``y = base ^ (shift + scale * x)`` (base -1 means e; defaults -1, 1, 0).

    Computed like Caffe as ``outer * exp(inner * x)`` with ``inner = ln(base) * scale`` and
    ``outer = base ^ shift``; the gradient is ``dy * y * inner``.
    """

    type = "Exp"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        _check_base(self, base)
        # Caffe's constants are floats: rounding the double product differs by an ulp.
        log_base = np.float32(1.0 if base == -1.0 else math.log(base))
        self.inner_scale = float(log_base * np.float32(scale))
        self.outer_scale = 1.0 if shift == 0.0 else float(np.float32(
            math.exp(shift) if base == -1.0 else base ** shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(x if self.inner_scale == 1.0 else x * self.inner_scale)
        return y if self.outer_scale == 1.0 else y * self.outer_scale


@register
class Log(_Neuron):
    """``y = log_base(shift + scale * x)`` (base -1 means e; defaults -1, 1, 0)."""

    type = "Log"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.log_param
        base = float(p.base)
        _check_base(self, base)
        if base == 1.0:  # Caffe's CHECK on 1/log(base) being finite
            raise self.error("base 1 has no logarithm (1/log(1) is infinite); use another "
                             "positive base, or -1 for base e")
        # Caffe's Dtype(1) / log_base is a float division of the float log(base).
        self.base_scale = 1.0 if base == -1.0 else float(np.float32(1.0)
                                                         / np.float32(math.log(base)))
        self.scale, self.shift = float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x
        if self.scale != 1.0:
            u = u * self.scale
        if self.shift != 0.0:
            u = u + self.shift
        y = torch.log(u)
        return y if self.base_scale == 1.0 else y * self.base_scale


@register
class BNLL(_Neuron):
    """Binomial normal log likelihood ``y = log(1 + exp(x))``, gradient ``dy * sigmoid(x)``.

    Caffe evaluates the stable ``x > 0 ? x + log(1 + e^-x) : log(1 + e^x)``. ``F.softplus``
    returns x itself above its threshold (20), where ``log(1 + e^-x) < 3e-9`` is below
    float32 resolution of x, so both agree to the last float32 bit; its gradient is
    ``sigmoid(x)`` (1 above the threshold, as Caffe's is in float32).
    """

    type = "BNLL"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


@register
class ELU(_Neuron):
    """``y = x`` for x > 0, ``alpha * (exp(x) - 1)`` otherwise (alpha default 1).

    Computed as Caffe does, ``exp(x) - 1`` rather than ``F.elu``'s expm1, which differ in
    float32 for small negative x (0.14% at x = -1e-5). Caffe's gradient for x <= 0 is
    ``dy * (y + alpha)`` = ``dy * alpha * exp(x)``, autograd's here (``alpha`` at x == 0).
    """

    type = "ELU"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.alpha = float(param.elu_param.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        negative = self.alpha * (torch.exp(torch.clamp(x, max=0.0)) - 1.0)
        return torch.where(x > 0, x, negative)


@register
class Dropout(_Neuron):
    """Inverted dropout: TRAIN ``y = x * mask / (1 - p)``, mask ~ Bernoulli(1 - p); TEST ``y = x``.

    ``F.dropout`` draws the same mask distribution and applies the same scale, and returns
    x untouched for p == 0. Caffe's mask comes from its own RNG, so masks are not
    bit-identical to a Caffe run. Two forks' fields:

    - ``scale_train: false`` (caffe-fast-rcnn): TRAIN ``y = x * mask`` and TEST
      ``y = x * (1 - p)`` (the classic, non-inverted dropout of py-faster-rcnn's ZF nets);
    - ``sample_weights_test: true`` (Bayesian SegNet): masks are drawn at TEST as in TRAIN,
      so repeated forwards of one input are Monte-Carlo samples.
    """

    type = "Dropout"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        dp = param.dropout_param
        self.ratio = float(dp.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_ratio ({self.ratio:g}) must be in [0, 1)")
        self.scale_train = bool(dp.scale_train)
        self.sampling = phase == TRAIN or bool(dp.sample_weights_test)
        self.draws_random = self.sampling and self.ratio > 0.0
        self.is_alias = not self.sampling and self.scale_train
        # Fast R-CNN's TEST factor: caffe_scal by 1/scale_, scale_ = 1/(1-p) held in float
        self.keep_factor = float(np.float32(1.0 / float(np.float32(1.0 / (1.0 - np.float32(
            self.ratio))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0.0:
            return x
        if not self.sampling:
            return x if self.scale_train else x * self.keep_factor
        if self.scale_train:
            return F.dropout(x, self.ratio, training=True)
        return x * torch.empty_like(x).bernoulli_(1.0 - self.ratio)


@register
class Threshold(_Neuron):
    """``y = 1 if x > threshold else 0`` (threshold default 0).

    Caffe has no backward for it, so the bottom is marked as taking no gradient.
    """

    type = "Threshold"
    no_grad_bottoms = (0,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.threshold = float(param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.detach() > self.threshold).to(x.dtype)


@register
class Clip(_Neuron):
    """``y = min(max(x, min), max)``; gradient passes where ``min <= x <= max`` (as torch.clamp)."""

    type = "Clip"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.min, self.max = float(p.min), float(p.max)
        if self.min > self.max:
            raise self.error(f"clip_param min ({self.min:g}) must not exceed max ({self.max:g})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.min, self.max)


@register
class Swish(_Neuron):
    """``y = x * sigmoid(beta * x)`` (beta default 1); autograd equals Caffe's
    ``dy * (beta * y + sigmoid(beta x) * (1 - beta * y))``."""

    type = "Swish"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.beta = float(param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta == 1.0:
            return F.silu(x)
        return x * torch.sigmoid(x * self.beta)


class _ReLU6Function(torch.autograd.Function):
    """The patches' gradient: ``dy * ((0 < x < 6) + slope * (x <= 0))``; none above 6."""

    @staticmethod
    def forward(ctx, x, slope: float):
        ctx.save_for_backward(x)
        ctx.slope = slope
        return torch.clamp(torch.clamp(x, min=0) + slope * torch.clamp(x, max=0), max=6.0)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        mask = ((x > 0) & (x < 6)).to(dy.dtype) + ctx.slope * (x <= 0).to(dy.dtype)
        return dy * mask, None


@register
class ReLU6(_Neuron):
    """MobileNet-v2 forks' ReLU6: ``y = min(max(x, 0) + negative_slope * min(x, 0), 6)``."""

    type = "ReLU6"
    origin = "the MobileNet-v2 ports"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.negative_slope = float(param.relu6_param.negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6Function.apply(x, self.negative_slope)
