"""The forks' ``BN`` layer: SegNet's two-blob version and PSPNet's four-blob version.

Both forks register the type ``BN`` with a ``bn_param``; the fields a prototxt sets decide
which one a layer is (docs/forks.md):

* PSPNet (hszhao/PSPNet ``bn_layer.cpp``) when it sets any of ``slope_filler``,
  ``bias_filler``, ``momentum``, ``eps``, ``frozen``, ``engine``, or gives more than two
  ``param`` blocks (PSPNet's prototxts give four);
* SegNet (alexgkendall/caffe-segnet ``bn_layer.cpp``) otherwise, as before PSPNet's was added.

Fields of both in one layer are an error.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caffe_compat.engine.fillers import fill
from caffe_compat.engine.layers.base import TEST, Layer, Shape, register
from caffe_compat.proto import caffe_pb2

_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")
_SEGNET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")
_CUDNN_MIN_EPS = 1e-5   # CUDNN_BN_MIN_EPSILON: the cuDNN engine never uses a smaller eps


class _StoredStatsNorm(torch.autograd.Function):
    """``x̂ = (x - mean) * inv_std`` with stored statistics, with PSPNet's backward for it: the
    batch-statistics formula ``inv_std * (g - mean(g) - x̂ * mean(x̂ * g))`` evaluated with
    those statistics (its TEST-phase backward when not frozen; not this forward's gradient)."""

    @staticmethod
    def forward(ctx, x, mean, inv_std):            # x (N, C, S); mean, inv_std (1, C, 1)
        x_hat = (x - mean) * inv_std
        ctx.save_for_backward(x_hat, inv_std)
        return x_hat

    @staticmethod
    def backward(ctx, g):
        x_hat, inv_std = ctx.saved_tensors
        mean_g = g.mean(dim=(0, 2), keepdim=True)
        mean_xg = (x_hat * g).mean(dim=(0, 2), keepdim=True)
        return (g - mean_g - x_hat * mean_xg) * inv_std, None, None


@register
class BN(Layer):
    """Batch normalisation with its own scale and shift: SegNet's or PSPNet's (module doc).

    **SegNet** (blobs ``scale``, ``shift``, each ``[1, C, 1, 1]``): ``bn_mode: LEARN`` (the
    default, in both phases) normalises with this batch's statistics over N, H, W: mean
    ``E[x]``, variance ``E[x²] - E[x]²``, ``eps`` 1e-9 added before the square root, then
    ``scale * x̂ + shift``; optional tops 1 and 2 are the batch mean and variance. ``bn_mode:
    INFERENCE`` is ``scale * x + shift`` only (SegNet's ``compute_bn_statistics.py`` folds the
    population statistics into the blobs). Fillers default to constant 0.

    **PSPNet** (blobs ``slope``, ``bias``, running ``mean``, running ``variance``, each
    ``[1, C, 1, 1]``; the running variance starts at 1 when ``frozen``, else 0): with stored
    statistics (``frozen: true``, or the TEST phase) ``y = slope * (x - mean) / sqrt(var +
    eps) + bias``; in TRAIN without ``frozen`` the batch mean and biased variance over N, H, W
    replace them and update the stored ones, ``s <- momentum * s + (1 - momentum) * batch``
    (``engine: CUDNN``: the unbiased batch variance, and eps at least 1e-5, as cuDNN does).
    The fork pins the statistics' lr_mult/decay_mult to 0, and the slope's and bias's too when
    ``frozen``; so does this layer, on the net's LayerParameter as the fork does on its own.
    Frozen, the gradient is ``dy * slope / sqrt(var + eps)`` and the slope and bias get none;
    TEST without ``frozen`` uses the fork's batch formula with the stored statistics.
    """

    type = "BN"
    family = "norm"
    origin = "alexgkendall/caffe-segnet and hszhao/PSPNet"
    num_tops = (1, 3)
    SEGNET_EPS = 1e-9

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise self.error(f"the bottom needs a channel axis, got shape {list(shape)}")
        self.pspnet = self._is_pspnet(param)
        if self.pspnet:
            self._init_pspnet(param, shape[1])
        else:
            self._init_segnet(param, shape[1])

    def _is_pspnet(self, param) -> bool:
        p = param.bn_param
        psp = [f for f in _PSPNET_FIELDS if p.HasField(f)]
        seg = [f for f in _SEGNET_FIELDS if p.HasField(f)]
        if psp and seg:
            raise self.error(f"bn_param mixes SegNet's {', '.join(seg)} with PSPNet's "
                             f"{', '.join(psp)}; a BN layer is one fork's or the other's")
        return bool(psp) or len(param.param) > 2

    def _init_segnet(self, param, channels: int) -> None:
        p = param.bn_param
        self.learn = p.bn_mode == caffe_pb2.BNParameter.LEARN
        if len(param.top) > 1 and not self.learn:
            raise self.error("the batch mean/variance tops exist only with bn_mode: LEARN")
        self.add_blob(fill(p.scale_filler, (1, channels, 1, 1)))
        self.add_blob(fill(p.shift_filler, (1, channels, 1, 1)))

    def _init_pspnet(self, param, channels: int) -> None:
        p = param.bn_param
        if len(param.top) > 1:
            raise self.error("PSPNet's BN (bn_param slope_filler/momentum/frozen...) has one "
                             "top; the batch mean/variance tops are SegNet's")
        if len(param.param) > 4:
            raise self.error(f"{len(param.param)} param blocks for PSPNet's 4 blobs")
        self.frozen = bool(p.frozen)
        self.momentum = float(p.momentum)
        self.cudnn = p.engine == caffe_pb2.BNParameter.CUDNN
        self.eps = max(float(p.eps), _CUDNN_MIN_EPS) if self.cudnn else float(p.eps)
        if self.eps < 0:
            raise self.error(f"bn_param.eps ({self.eps:g}) must not be negative")
        shape = (1, channels, 1, 1)
        self.add_blob(fill(p.slope_filler, shape))
        self.add_blob(fill(p.bias_filler, shape))
        self.add_blob(torch.zeros(shape), learnable=False)
        self.add_blob(torch.full(shape, 1.0 if self.frozen else 0.0), learnable=False)
        while len(param.param) < 4:
            param.param.add()
        for i in (0, 1, 2, 3) if self.frozen else (2, 3):
            param.param[i].lr_mult = 0.0
            param.param[i].decay_mult = 0.0

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        stats = (1, bottom_shapes[0][1], 1, 1)
        return [tuple(bottom_shapes[0])] + [stats] * (len(self.param.top) - 1)

    def forward(self, x: torch.Tensor):
        flat = x.reshape(x.shape[0], x.shape[1], -1)             # (N, C, S)
        if self.pspnet:
            return self._forward_pspnet(flat).reshape(x.shape)
        return self._forward_segnet(flat, x.shape)

    def _forward_segnet(self, flat: torch.Tensor, shape):
        scale, shift = (b.reshape(1, -1, 1) for b in self.blobs)
        if not self.learn:
            return (flat * scale + shift).reshape(shape)
        mean = flat.mean(dim=2, keepdim=True).mean(dim=0, keepdim=True)
        mean_sq = flat.square().mean(dim=2, keepdim=True).mean(dim=0, keepdim=True)
        var = mean_sq - mean.square()
        out = ((flat - mean) / torch.sqrt(var + self.SEGNET_EPS) * scale + shift).reshape(shape)
        extras = (mean.reshape(1, -1, 1, 1), var.reshape(1, -1, 1, 1))
        tops = (out,) + extras[:len(self.param.top) - 1]
        return tops if len(tops) > 1 else out

    def _forward_pspnet(self, flat: torch.Tensor) -> torch.Tensor:
        slope, bias, mean, var = (b.reshape(1, -1, 1).to(flat.dtype) for b in self.blobs)
        if self.frozen or self.phase == TEST:
            inv_std = torch.rsqrt(var.detach() + self.eps)
            if self.frozen:      # nothing learned: slope and bias are constants here
                return (flat - mean.detach()) * inv_std * slope.detach() + bias.detach()
            return _StoredStatsNorm.apply(flat, mean.detach(), inv_std) * slope + bias
        batch_mean = flat.mean(dim=(0, 2), keepdim=True)
        centred = flat - batch_mean
        batch_var = centred.square().mean(dim=(0, 2), keepdim=True)   # biased, as PSPNet
        self._update_running(batch_mean.detach(), batch_var.detach(),
                             flat.numel() // flat.shape[1])
        return centred * torch.rsqrt(batch_var + self.eps) * slope + bias

    def _update_running(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, m: int) -> None:
        if self.cudnn and m > 1:
            batch_var = batch_var * (m / (m - 1))        # cuDNN keeps the unbiased variance
        with torch.no_grad():
            for blob, batch in ((self.blobs[2], batch_mean), (self.blobs[3], batch_var)):
                blob.mul_(self.momentum).add_(batch.reshape(blob.shape).to(blob.dtype),
                                              alpha=1.0 - self.momentum)

    def affine(self, channels: int):
        """Per-channel ``(a, s)`` where the forward is ``a * x + s``: SegNet's INFERENCE mode,
        PSPNet's with stored statistics."""
        if self.blobs[0].numel() != channels:
            return None
        blobs = [b.detach().double().reshape(-1) for b in self.blobs]
        if not self.pspnet:
            return None if self.learn else (blobs[0], blobs[1])
        if not (self.frozen or self.phase == TEST):
            return None
        slope, bias, mean, var = blobs
        a = slope / torch.sqrt(var + self.eps)
        return a, bias - mean * a
