"""Caffe's Tile, Softmax, ArgMax, Silence and Reduction layers (the "common" family)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.layers import fast_forms


@register
class Tile(Layer):
    """Repeat the block of axes ``[axis, end)`` ``tiles`` times: shape[axis] *= tiles."""

    type = "Tile"
    family = "common"
    num_bottoms = (1, 1)
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.tile_param
        if not p.HasField("tiles") or p.tiles < 1:
            raise self.error(f"tiles must be given and positive (got {p.tiles})")
        self.tiles = p.tiles
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        axis = canonical_axis(self, self.param.tile_param.axis, len(shape))
        return [shape[:axis] + (shape[axis] * self.tiles,) + shape[axis + 1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = canonical_axis(self, self.param.tile_param.axis, x.dim())
        # Caffe copies the whole trailing block [axis:] per tile, which is repeat() on that axis.
        reps = [1] * x.dim()
        reps[axis] = self.tiles
        return x.repeat(reps)


# ---------------------------------------------------------------------------- Softmax / ArgMax


@register
class Softmax(Layer):
    """Max-subtracted softmax along ``axis`` (F.softmax computes the same)."""

    type = "Softmax"
    specialized = fast_forms.softmax      # a batch-1 forward without per-call work
    family = "common"
    num_bottoms = (1, 1)
    num_tops = (1, 1)
    full_precision = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        canonical_axis(self, param.softmax_param.axis, len(bottom_shapes[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=canonical_axis(self, self.param.softmax_param.axis, x.dim()))


@register
class ArgMax(Layer):
    """Indices (and optionally values) of the ``top_k`` largest entries; no backward.

    Without ``axis`` each sample is flattened and the top is ``(N, 1, top_k)`` (indices) or
    ``(N, 2, top_k)`` (indices, then values), padded with trailing 1s to the bottom's rank.
    With ``axis`` the top is the bottom shape with ``top_k`` on that axis, holding the values
    when ``out_max_val`` else the indices. Ties rank the larger index first, like Caffe's
    sort on (value, index) pairs. Indices are returned as floats, as Caffe stores them.
    """

    type = "ArgMax"
    family = "common"
    num_bottoms = (1, 1)
    num_tops = (1, 1)
    no_grad_bottoms = (0,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.argmax_param
        if p.top_k < 1:
            raise self.error(f"top_k ({p.top_k}) must be at least 1")
        self.top_k = p.top_k
        self.out_max_val = bool(p.out_max_val)
        self.has_axis = p.HasField("axis")
        self.top_shapes(bottom_shapes)

    def _axis(self, ndim: int) -> int:
        return canonical_axis(self, self.param.argmax_param.axis, ndim)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        if self.has_axis:
            axis = self._axis(len(shape))
            if self.top_k > shape[axis]:
                raise self.error(f"top_k ({self.top_k}) must not exceed the size of axis {axis} "
                                 f"({shape[axis]})")
            return [shape[:axis] + (self.top_k,) + shape[axis + 1:]]
        classes = math.prod(shape[1:])
        if self.top_k > classes:
            raise self.error(f"top_k ({self.top_k}) must not exceed the number of classes "
                             f"({classes} = product of bottom shape {list(shape)} after axis 0)")
        top = [1] * max(3, len(shape))
        top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        return [tuple(top)]

    def _top_k(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and indices of the k largest along ``dim``, ties to the larger index."""
        n = x.shape[dim]
        # A stable descending sort of the reversed axis keeps larger original indices first.
        values, order = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        values = values.narrow(dim, 0, self.top_k)
        index = (n - 1) - order.narrow(dim, 0, self.top_k)
        return values, index.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_shape = self.top_shapes([tuple(x.shape)])[0]
        x = x.detach()
        if self.has_axis:
            values, index = self._top_k(x, self._axis(x.dim()))
            return values if self.out_max_val else index
        values, index = self._top_k(x.reshape(x.shape[0], -1), 1)  # (N, top_k) each
        out = torch.stack([index, values], 1) if self.out_max_val else index.unsqueeze(1)
        return out.reshape(top_shape)


# ---------------------------------------------------------------------------- Silence / Reduction


@register
class Silence(Layer):
    """Consumes its bottoms and produces nothing (keeps them out of the net outputs).

    Caffe's backward writes zero diffs to its bottoms; with no tops there is nothing for
    autograd to carry, so a bottom consumed only here ends up with no gradient, which the
    builder reports as zeros.
    """

    type = "Silence"
    family = "common"
    num_bottoms = (1, None)
    num_tops = (0, 0)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return []

    def forward(self, *bottoms: torch.Tensor) -> tuple:
        return ()


@register
class Reduction(Layer):
    """SUM, ASUM, SUMSQ or MEAN over axes ``[axis, end)``, times ``coeff``.

    The top has shape ``bottom.shape[:axis]`` (a 0-d tensor for the default axis 0).
    Autograd's gradients equal Caffe's (``sign(0) == 0`` for ASUM).
    """

    type = "Reduction"
    family = "common"
    num_bottoms = (1, 1)
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.reduction_param
        R = caffe_pb2.ReductionParameter
        if p.operation not in (R.SUM, R.ASUM, R.SUMSQ, R.MEAN):
            raise self.error(f"unknown operation {p.operation} (known: SUM, ASUM, SUMSQ, MEAN)")
        self.operation = p.operation
        self.coeff = float(p.coeff)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        return [shape[:canonical_axis(self, self.param.reduction_param.axis, len(shape))]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R = caffe_pb2.ReductionParameter
        axis = canonical_axis(self, self.param.reduction_param.axis, x.dim())
        flat = x.reshape(tuple(x.shape[:axis]) + (-1,))  # (outer..., dim)
        if self.operation == R.ASUM:
            flat = flat.abs()
        elif self.operation == R.SUMSQ:
            flat = flat * flat
        top = flat.sum(-1)
        coeff = self.coeff
        if self.operation == R.MEAN:
            coeff /= flat.shape[-1]
        return top * coeff if coeff != 1.0 else top
