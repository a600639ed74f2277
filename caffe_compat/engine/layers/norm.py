"""Normalisation and affine layers: BatchNorm, Scale, Bias, MVN (the forks' BN: bn_forks.py).

Caffe splits a BatchNorm with affine parameters into ``BatchNorm`` (statistics only) followed
by ``Scale`` with ``bias_term: true``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.fillers import fill
from caffe_compat.engine.layers.base import REDUCED_DTYPES, TEST, Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis
from caffe_compat.proto import caffe_pb2


@register
class BatchNorm(Layer):
    """``y = (x - mean) / sqrt(var + eps)`` per channel (axis 1), no affine part.

    Blobs (all non-learnable, lr_mult forced to 0): [0] mean sum ``[C]``, [1] variance sum
    ``[C]``, [2] scale factor ``[1]``. With batch statistics (the TRAIN default) every forward
    normalises with the batch mean and biased variance over m = N * spatial values and
    updates the sums: ``s <- lambda*s + 1``, ``mean_sum <- lambda*mean_sum + mu``,
    ``var_sum <- lambda*var_sum + m/(m-1) * sigma^2``. With global statistics (the TEST
    default) it uses ``mean_sum/s`` and ``var_sum/s`` (0 when s == 0), and the gradient is
    just ``dy / sqrt(var + eps)``.

    ``update_global_stats`` (DeepLab v2 / PSPNet ``batch_norm_layer.cpp``), with global
    statistics in the TRAIN phase: the variance ``v = E[(x - mean)²]`` around the stored mean
    normalises this batch (the gradient still treats it as a constant) and enters the running
    sums as above (``m/(m-1) * v``); the mean sum takes the stored mean, so the mean stays.
    """

    type = "BatchNorm"
    keeps_coords = True
    # Under bf16/fp16 autocast the input stays reduced while the statistics are computed and
    # kept in float32 (torch's mixed-precision batch norm; float32 buffers below), as
    # nn.BatchNorm2d runs under autocast: no float32 copy of every activation.
    full_precision = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        # Caffe masks the statistics from the solver by appending a ParamSpec with lr_mult 0
        # for each blob the prototxt leaves unspecified, and rejects a nonzero lr_mult. We do
        # the same on a private copy, so a snapshot of self.param carries those entries too.
        own = caffe_pb2.LayerParameter()
        own.CopyFrom(param)
        super().__init__(own, bottom_shapes, phase)
        for i, spec in enumerate(own.param[:3]):
            if spec.lr_mult != 0:
                raise self.error(f"param {i} has lr_mult {spec.lr_mult:g}; the statistics of batch "
                                 "normalization cannot be learned: set lr_mult: 0 or drop the "
                                 "param block (use a Scale layer for a learned affine part)")
        while len(own.param) < 3:
            own.param.add().lr_mult = 0.0

        p = own.batch_norm_param
        shape = tuple(bottom_shapes[0])
        if len(shape) == 0:
            raise self.error("bottom must have at least one axis")
        self.channels = 1 if len(shape) == 1 else shape[1]
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else phase == TEST)
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        self.refit_variance = (p.update_global_stats and self.use_global_stats
                               and phase != TEST)
        if self.eps < 0:
            raise self.error(f"eps ({self.eps:g}) must not be negative")
        for blob_shape in ((self.channels,), (self.channels,), (1,)):
            self.add_blob(torch.zeros(blob_shape), learnable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.batch_norm wants (N, C, *); Caffe treats a 1-D bottom as one channel.
        xc = x.reshape(-1, 1) if x.dim() == 1 else x
        if xc.shape[1] != self.channels:
            raise self.error(f"bottom has {xc.shape[1]} channels, the layer was built for "
                             f"{self.channels}")
        return self.normalize(xc).reshape(x.shape)

    def normalize(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (N, C, *) normalised as this layer does, then ``* weight + bias`` per
        channel when given (a following Scale layer's gamma and beta, in one op)."""
        affine = [None if t is None else t.to(stats_dtype(x)) for t in (weight, bias)]
        if self.refit_variance:
            return self._refit_variance(x, *affine)
        if self.use_global_stats:
            return self._global_stats(x, *affine)
        return self._batch_stats(x, *affine)

    def output_not_saved(self, num_bottoms: int) -> bool:
        return True

    def affine(self, channels: int):
        if not self.use_global_stats or self.channels != channels:
            return None
        mean_sum, var_sum, factor = (b.detach().double() for b in self.blobs)
        inv = 0.0 if float(factor[0]) == 0 else 1.0 / float(factor[0])
        a = 1.0 / torch.sqrt(var_sum * inv + self.eps)
        return a, -mean_sum * inv * a

    def absorbs_affine(self) -> int | None:
        return self.channels

    def forward_affine(self, x, gamma, beta):
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise self.error(f"bottom {list(x.shape)} has no axis 1 of {self.channels} "
                             "channels to normalise")
        return self.normalize(x, gamma, beta)

    def _global_stats(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        mean_sum, var_sum, factor = (b.detach() for b in self.blobs)
        with torch.no_grad():
            # 1/s, or 0 when no statistics were accumulated (Caffe's rule); stays on device.
            inv = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
            mean = (mean_sum * inv).to(stats_dtype(x))  # (C,)
            var = (var_sum * inv).to(stats_dtype(x))    # (C,)
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=self.eps)

    def _refit_variance(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """The stored mean, and this batch's variance around it (update_global_stats)."""
        mean_sum, factor = self.blobs[0].detach(), self.blobs[2].detach()
        with torch.no_grad():
            inv = torch.where(factor == 0, torch.zeros_like(factor), 1.0 / factor)
            mean = (mean_sum * inv).to(stats_dtype(x))                   # (C,)
            channel = (1, -1) + (1,) * (x.dim() - 2)
            dims = [d for d in range(x.dim()) if d != 1]
            var = (x.to(mean.dtype) - mean.view(channel)).square().mean(dim=dims)
            m = x.numel() // x.shape[1]
            self._accumulate(mean, var * (m / (m - 1) if m > 1 else 1.0))
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=self.eps)

    def _batch_stats(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        m = x.numel() // x.shape[1]
        if m == 1:
            # One value per channel: mean = x and var = 0, so y = x - x = 0 with a zero
            # gradient, as Caffe's backward gives (F.batch_norm refuses this case).
            mean = x.detach().reshape(-1)
            unbiased_var = torch.zeros_like(mean)  # Caffe's bias correction is 1 for m == 1
            y = x - x
            channel = (1, -1) + (1,) * (x.dim() - 2)
            if weight is not None:
                y = y * weight.view(channel)
            if bias is not None:
                y = y + bias.view(channel)
        else:
            # momentum=1 makes F.batch_norm write the batch mean and the unbiased (m/(m-1))
            # variance into these buffers, exactly the terms Caffe adds to its running sums;
            # the normalisation itself uses the biased variance, as Caffe does, and autograd
            # through it is Caffe's batch-statistics backward. Float32 buffers for a bf16/fp16
            # input: torch's mixed-precision batch norm then keeps the statistics in float32.
            mean = torch.zeros(x.shape[1], dtype=stats_dtype(x), device=x.device)
            unbiased_var = torch.ones(x.shape[1], dtype=stats_dtype(x), device=x.device)
            y = F.batch_norm(x, mean, unbiased_var, weight, bias, training=True, momentum=1.0,
                             eps=self.eps)
        self._accumulate(mean, unbiased_var)
        return y

    def _accumulate(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """Fold one batch's mean and unbiased variance into the running sums (Caffe's
        ``s <- lambda*s + 1`` and likewise for each sum)."""
        lam = self.moving_average_fraction
        with torch.no_grad():
            mean_sum, var_sum, factor = self.blobs
            factor.mul_(lam).add_(1.0)
            mean_sum.mul_(lam).add_(mean.to(mean_sum.dtype))
            var_sum.mul_(lam).add_(unbiased_var.to(var_sum.dtype))


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 statistics for a bf16/fp16 input, the input's own dtype otherwise."""
    return torch.float32 if x.dtype in REDUCED_DTYPES else x.dtype


class _Broadcast(Layer):
    """Shared part of Scale and Bias: an operand broadcast over bottom 0's axes
    ``[axis, axis + operand.ndim)``, taken from bottom 1 or learned as blob 0."""

    num_bottoms = (1, 2)
    num_tops = (1, 1)
    keeps_coords = True      # the operand broadcasts over bottom 0's pixels, which stay put

    def _operand_shape(self, p, bottom_shapes: Sequence[Shape]) -> Shape:
        """Shape of the operand (learned blob or bottom 1) after checking it against bottom 0."""
        x_shape = tuple(bottom_shapes[0])
        ndim = len(x_shape)
        self.operand_from_bottom = len(bottom_shapes) > 1
        if len(bottom_shapes) > 1:
            shape = tuple(bottom_shapes[1])
        else:
            axis = canonical_axis(self, p.axis, ndim)
            if p.num_axes < -1:
                raise self.error(f"num_axes ({p.num_axes}) must be non-negative, or -1 to "
                                 "extend to the last axis of the bottom")
            end = ndim if p.num_axes == -1 else axis + p.num_axes
            if end > ndim:
                raise self.error(f"axis ({p.axis}) + num_axes ({p.num_axes}) exceeds the "
                                 f"{ndim} axes of bottom shape {list(x_shape)}")
            shape = x_shape[axis:end]
        # A scalar operand lines up with axis 0 whatever axis says (Caffe does the same).
        self.axis = 0 if len(shape) == 0 else canonical_axis(self, p.axis, ndim)
        if x_shape[self.axis:self.axis + len(shape)] != shape:
            raise self.error(f"{self.operand_name} shape {list(shape)} does not match bottom shape "
                             f"{list(x_shape)} at axes {self.axis}..{self.axis + len(shape) - 1}")
        return shape

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` reshaped so it broadcasts over ``x`` starting at ``self.axis``."""
        trailing = x.dim() - self.axis - t.dim()
        return t.reshape((1,) * self.axis + tuple(t.shape) + (1,) * trailing).to(x.dtype)

    def output_not_saved(self, num_bottoms: int) -> bool:
        return num_bottoms == 1

    def _learned_operand(self, channels: int) -> bool:
        """A learned blob 0 of ``channels`` values on axis 1 (not an operand bottom)."""
        return not self.operand_from_bottom and self.axis == 1 and \
            tuple(self.blobs[0].shape) == (channels,)


def _filler_or_constant(p, field: str, value: float):
    """``p.<field>`` if the prototxt sets it, else Caffe's default constant filler."""
    if p.HasField(field):
        return getattr(p, field)
    return caffe_pb2.FillerParameter(type="constant", value=value)


@register
class Scale(_Broadcast):
    """``y = x * gamma (+ beta)``, gamma broadcast over ``[axis, axis + num_axes)``.

    gamma is bottom 1 when given (then ``num_axes`` is ignored), else blob 0 (filler default
    constant 1). With ``bias_term`` a beta of gamma's shape follows as the last blob (filler
    ``bias_filler``, default constant 0). Gradients flow to x, gamma and beta.
    """

    type = "Scale"
    operand_name = "scale"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.scale_param
        shape = self._operand_shape(p, bottom_shapes)
        self.scale_from_bottom = len(bottom_shapes) > 1
        if not self.scale_from_bottom:
            self.add_blob(fill(_filler_or_constant(p, "filler", 1.0), shape))
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob(fill(_filler_or_constant(p, "bias_filler", 0.0), shape))

    def forward(self, x: torch.Tensor, *scale: torch.Tensor) -> torch.Tensor:
        gamma = self._view(scale[0] if self.scale_from_bottom else self.blobs[0], x)
        if self.bias_term:
            return torch.addcmul(self._view(self.blobs[-1], x), x, gamma)
        return x * gamma

    def learned_affine(self, channels: int):
        if not self._learned_operand(channels):
            return None
        return self.blobs[0], (self.blobs[-1] if self.bias_term else None)

    def affine(self, channels: int):
        if not self._learned_operand(channels):
            return None
        gamma, beta = (b.detach().double() for b in (self.blobs[0], self.blobs[-1]))
        return gamma, beta if self.bias_term else torch.zeros(channels, dtype=torch.float64)


@register
class Bias(_Broadcast):
    """``y = x + beta``, beta broadcast over ``[axis, axis + num_axes)``.

    beta is bottom 1 when given (then ``num_axes`` is ignored), else blob 0 (filler default
    constant 0).
    """

    type = "Bias"
    operand_name = "bias"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.bias_param
        shape = self._operand_shape(p, bottom_shapes)
        self.bias_from_bottom = len(bottom_shapes) > 1
        if not self.bias_from_bottom:
            self.add_blob(fill(_filler_or_constant(p, "filler", 0.0), shape))

    def forward(self, x: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        return x + self._view(bias[0] if self.bias_from_bottom else self.blobs[0], x)

    def affine(self, channels: int):
        if not self._learned_operand(channels):
            return None
        return torch.ones(channels, dtype=torch.float64), self.blobs[0].detach().double()


class _MVNFunction(torch.autograd.Function):
    """MVN with variance normalisation and Caffe's backward (``mvn_layer.cpp``):
    ``dx = (dy - mean(dy) - y * mean(y * dy)) / (std + eps)``, which leaves eps out of the
    ``y`` term where the exact derivative would keep it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):        # x: (num, dim)
        centred = x - x.mean(dim=1, keepdim=True)
        denom = (centred * centred).mean(dim=1, keepdim=True).sqrt() + eps
        y = centred / denom
        ctx.save_for_backward(y, denom)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, denom = ctx.saved_tensors
        dx = dy - dy.mean(dim=1, keepdim=True) - y * (y * dy).mean(dim=1, keepdim=True)
        return dx / denom, None


@register
class MVN(Layer):
    """Caffe MVN: subtract the mean and, by default, divide by ``std + eps`` (not
    ``sqrt(var + eps)``), per (n, c) or, with ``across_channels``, per n."""

    type = "MVN"
    keeps_coords = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        mp = param.mvn_param
        self.normalize_variance = mp.normalize_variance
        self.across_channels = mp.across_channels
        self.eps = float(mp.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Caffe's num: shape[0] across channels, else shape[0] * shape[1] (legacy 4-D view).
        num = x.shape[0] if self.across_channels or x.dim() < 2 else x.shape[0] * x.shape[1]
        flat = x.reshape(num, -1)
        if self.normalize_variance:
            return _MVNFunction.apply(flat, self.eps).reshape(x.shape)
        return (flat - flat.mean(dim=1, keepdim=True)).reshape(x.shape)
