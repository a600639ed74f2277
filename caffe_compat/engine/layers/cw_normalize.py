"""happynear/caffe-windows' parameter-free ``Normalize`` (branch ms, ``normalize_layer.cu``).

SSD registers the same type name with a learned scale (``ssd.Normalize``); that layer class
dispatches here when a layer sets ``normalize_param`` (docs/forks.md). This module holds only
caffe-windows' arithmetic:

* each sample and spatial position is divided by its norm across the channels: L2
  ``sqrt(sum x² + 1e-12)`` (the fork's CUDA forward, which AM-Softmax and arcface-caffe
  trained with; its CPU forward adds 1e-6 instead) or L1 ``sum |x| + 1e-6``;
* the bottom is read as Caffe's legacy ``num × channels × height·width`` (at most 4 axes) and
  the top is always 4-D ``[num, channels, height, width]``, as the fork reshapes it (a
  ``[N, 512]`` feature becomes ``[N, 512, 1, 1]``); optional top 1 is the norm ``[N, 1, H, W]``;
* backward ``(dy - t·Σ_c(y·dy)) / norm`` with t = y (L2) or sign(x) (L1): the exact gradient;
  ``fix_gradient`` skips the division (only the fork's CUDA backward reads it); ``bp_norm``
  with the norm top adds ``dnorm·t``, the norm's own gradient; without it the norm top's diff
  is dropped, as the fork's.
"""
from __future__ import annotations

import torch

from caffe_compat.engine.layers.base import Shape

ORIGIN = "happynear/caffe-windows branch ms"
_EPS = {"L2": 1e-12, "L1": 1e-6}


def legacy_shape(shape: Shape) -> tuple[int, int, int, int]:
    """Caffe's num(), channels(), height(), width() of a blob of at most 4 axes."""
    padded = tuple(shape) + (1,) * (4 - len(shape))
    return padded[0], padded[1], padded[2], padded[3]


class CaffeWindowsNorm:
    """The settings of one caffe-windows Normalize layer, read from ``normalize_param``."""

    def __init__(self, layer, param, bottom_shape: Shape):
        p = param.normalize_param
        if param.HasField("norm_param"):
            raise layer.error("sets both norm_param (SSD's Normalize, a learned scale) and "
                              "normalize_param (caffe-windows' parameter-free one); a Normalize "
                              "layer is one fork's or the other's")
        if len(bottom_shape) > 4:
            raise layer.error(f"caffe-windows' Normalize reads the bottom as num × channels × "
                              f"height × width: at most 4 axes, got {list(bottom_shape)}")
        if p.normalize_type not in _EPS:
            raise layer.error(f"normalize_param.normalize_type {p.normalize_type!r}: the fork "
                              f"implements \"L2\" and \"L1\" only")
        self.kind = p.normalize_type
        self.fix_gradient = bool(p.fix_gradient)
        self.bp_norm = bool(p.bp_norm) and len(param.top) == 2
        self.two_tops = len(param.top) == 2

    def top_shapes(self, bottom_shape: Shape) -> list[Shape]:
        n, c, h, w = legacy_shape(bottom_shape)
        return [(n, c, h, w), (n, 1, h, w)][:2 if self.two_tops else 1]

    def forward(self, x: torch.Tensor):
        n, c, h, w = legacy_shape(tuple(x.shape))
        flat = x.reshape(n, c, h * w)
        y, norm = _CaffeWindowsNormalize.apply(flat, self.kind, self.fix_gradient,
                                               self.bp_norm)
        y = y.reshape(n, c, h, w)
        return (y, norm.reshape(n, 1, h, w)) if self.two_tops else y


class _CaffeWindowsNormalize(torch.autograd.Function):
    """``y = x / norm`` per (sample, position) over axis 1 of ``[N, C, S]``; the fork's
    backward (module doc)."""

    @staticmethod
    def forward(ctx, flat, kind: str, fix_gradient: bool, bp_norm: bool):
        size = flat.abs() if kind == "L1" else flat.square()
        norm = size.sum(dim=1, keepdim=True) + _EPS[kind]
        if kind == "L2":
            norm = norm.sqrt()
        y = flat / norm
        ctx.save_for_backward(flat, y, norm)
        ctx.kind, ctx.fix_gradient, ctx.bp_norm = kind, fix_gradient, bp_norm
        return y, norm

    @staticmethod
    def backward(ctx, dy, dnorm):
        flat, y, norm = ctx.saved_tensors
        along = y if ctx.kind == "L2" else torch.sign(flat)
        dx = dy - along * (y * dy).sum(dim=1, keepdim=True)
        if not ctx.fix_gradient:
            dx = dx / norm
        if ctx.bp_norm and dnorm is not None:
            dx = dx + dnorm * along
        return dx, None, None, None

