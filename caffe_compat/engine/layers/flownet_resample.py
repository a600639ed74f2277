"""lmb-freiburg/flownet2's ``Resample`` layer (its GPU kernels; the CPU forward is a FATAL).

The LINEAR/CUBIC kernel weights pixel (y, x) of the bottom by ``w(y_in − y)·w(x_in − x)``
over a window, and divides by the sum of the weights inside the image. The window is a
rectangle, so the sum factors: the layer is ``A_y · X · A_xᵀ`` with each row of ``A``
normalised on its own, built here once per shape in float64.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.engine.layers.flownet import FLOWNET2
from caffe_compat.proto import caffe_pb2

_R = caffe_pb2.ResampleParameter
F32 = np.float32


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = x * x * (1.5 * x - 2.5) + 1.0
    far = x * (x * (-0.5 * x + 2.5) - 4.0) + 2.0
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -1) & (x <= 1), 1 - np.abs(x), 0.0)


def source_positions(out: int, factor: F32, other_factor: F32) -> np.ndarray:
    """Where top pixel i reads, in float32 as the kernel: ``i·f + f'/2 − 0.5``, with the
    OTHER axis's factor f' in the offset (the fork's kernel swaps fx and fy there)."""
    i = np.arange(out, dtype=F32)
    return (i * factor + other_factor / F32(2) - F32(0.5)).astype(F32)


def c_round(x: np.ndarray) -> np.ndarray:
    """C's ``round``: halves away from zero."""
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def filter_matrix(size_in: int, size_out: int, factor: F32, other: F32, cubic: bool,
                  antialias: bool) -> np.ndarray:
    """``[out, in]`` float64 rows of the normalised kernel weights along one axis."""
    pos = source_positions(size_out, factor, other).astype(np.float64)
    scale = 1.0 / float(factor) if antialias else 1.0
    width = 4 if cubic else 2
    radius = 2 if factor < 1 else math.ceil(width / scale)
    centre = c_round(pos)
    taps = np.arange(size_in)[None, :]
    inside = np.abs(taps - centre[:, None]) <= radius
    weights = (_cubic if cubic else _triangle)(scale * (pos[:, None] - taps)) * scale
    weights = np.where(inside, weights, 0.0)
    sums = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, sums, out=np.zeros_like(weights), where=sums != 0)


@register
class Resample(Layer):
    """Resize bottom 0 ``[N, C, H, W]`` to ``resample_param``'s ``height`` × ``width``, or
    with two bottoms to bottom 1's height and width (bottom 1 gives only its size).

    With factors ``f = in/out`` per axis (float32), top pixel i reads bottom position
    ``i·f_x + f_y/2 − 0.5`` along x and ``i·f_y + f_x/2 − 0.5`` along y: the fork's kernel
    swaps the factors in the offset, reproduced (equal factors give the usual
    pixel-centre mapping). NEAREST takes the pixel at C's ``round`` of it (clamped to the
    bottom, where the fork would read outside). LINEAR (triangle) and CUBIC (Keys, a =
    −0.5) weight the pixels of a window around it; shrinking with ``antialias`` (default)
    stretches the filter by ``f``; the weights inside the bottom are normalised to sum 1.
    AREA is refused, as by the fork; ``factor`` is read by no fork code. No backward (the
    fork's is a FATAL).
    """

    type = "Resample"
    origin = FLOWNET2
    family = "flownet"
    num_bottoms = (1, 2)
    no_grad_bottoms = (0, 1)
    exports_to_onnx = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.resample_param
        if p.type == _R.AREA:
            raise self.error("type AREA is not supported (the fork accepts only NEAREST, "
                             "LINEAR and CUBIC)")
        self.kind, self.antialias = p.type, p.antialias
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        if len(bottom_shapes[0]) > 4:
            raise self.error(f"bottom 0 must have at most 4 axes, got "
                             f"{list(bottom_shapes[0])}")
        n, c, h, w = legacy_shape(tuple(bottom_shapes[0]))
        if len(bottom_shapes) == 2:
            out = legacy_shape(tuple(bottom_shapes[1]))[2:]
        else:
            out = (self.param.resample_param.height, self.param.resample_param.width)
        if min(out) < 1:
            raise self.error(f"the top size must be positive, got {out[0]}x{out[1]} (set "
                             f"resample_param height and width, or give a reference bottom)")
        self.plan = self._matrices((h, w), tuple(out))
        return [(n, c, *out)]

    def _matrices(self, size_in, size_out):
        fy, fx = (F32(i) / F32(o) for i, o in zip(size_in, size_out))
        if self.kind == _R.NEAREST:
            rows = c_round(source_positions(size_out[0], fy, fx)).clip(0, size_in[0] - 1)
            cols = c_round(source_positions(size_out[1], fx, fy)).clip(0, size_in[1] - 1)
            return torch.from_numpy(rows), torch.from_numpy(cols)
        cubic = self.kind == _R.CUBIC
        antialias = self.antialias and (fx > 1 or fy > 1)
        return (torch.from_numpy(filter_matrix(size_in[0], size_out[0], fy, fx, cubic,
                                               antialias)),
                torch.from_numpy(filter_matrix(size_in[1], size_out[1], fx, fy, cubic,
                                               antialias)))

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        x = x.reshape(legacy_shape(tuple(x.shape)))
        rows, cols = (m.to(x.device) for m in self.plan)
        if self.kind == _R.NEAREST:
            return x.index_select(2, rows).index_select(3, cols)
        rows, cols = rows.to(x.dtype), cols.to(x.dtype)
        return torch.einsum("yh,nchw,xw->ncyx", rows, x, cols)
