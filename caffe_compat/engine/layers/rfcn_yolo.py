"""Two detection-net fork layers: R-FCN's PSROIPooling and the YOLOv2 ports' Reorg.

PSROIPooling is listed under ``pooling`` in the README's layer table, Reorg under ``common``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caffe_compat.engine.layers.base import Layer, Shape, register


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` goes to even)."""
    whole = torch.trunc(v)
    return whole + torch.sign(v) * ((v - whole).abs() >= 0.5).to(v.dtype)


@register
class PSROIPooling(Layer):
    """daijifeng001/caffe-rfcn's PSROIPooling: each region ``[batch, x1, y1, x2, y2]`` (image
    coordinates) average-pooled into a ``k × k`` grid (``k = group_size``), output channel
    ``d`` of bin ``(i, j)`` reading input channel ``(d·k + i)·k + j``; top ``[R, D, k, k]``.

    As the fork's kernel, in float32: the region spans ``round(x1)·s`` to ``(round(x2)+1)·s``
    (``s = spatial_scale``, C rounding) and is at least 0.1 wide and high; bin ``i`` covers
    rows ``[floor(i·b + y0), ceil((i+1)·b + y0))`` with ``b = height / k``, clipped to the map;
    an empty bin gives 0 (the CPU kernel's float order; a CUDA build may fuse ``i·b + y0`` into
    one multiply-add and differ where a bound lands on an integer). The gradient spreads each bin's top gradient evenly over its pixels
    (the fork's backward). The fork's internal ``mapping_channel`` is not a top.
    """

    type = "PSROIPooling"
    family = "pooling"
    origin = "daijifeng001/caffe-rfcn"
    exports_to_onnx = False
    traceable = False
    num_bottoms = (2, 2)
    no_grad_bottoms = (1,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.psroi_pooling_param
        self.output_dim, self.group = int(p.output_dim), int(p.group_size)
        if self.output_dim <= 0:
            raise self.error("output_dim must be > 0")
        if self.group <= 0:
            raise self.error("group_size must be > 0")
        self.spatial_scale = float(p.spatial_scale)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        x, rois = (tuple(s) for s in bottom_shapes)
        count = 1
        for d in rois[1:]:
            count *= d
        if len(x) != 4 or not rois or count != 5:
            raise self.error(f"needs a 4-D map and [R, 5] regions, got {list(x)} and {list(rois)}")
        k = self.group
        if x[1] != self.output_dim * k * k:
            raise self.error(f"input channels ({x[1]}) must be output_dim·group_size² "
                             f"({self.output_dim}·{k}²)")
        return [(rois[0], self.output_dim, k, k)]

    def _bounds(self, rois: torch.Tensor, size: int, lo: int, hi: int):
        """Bin bounds along one axis, [R, k] each, from region columns ``lo`` and ``hi``."""
        f32 = torch.float32
        scale = torch.tensor(self.spatial_scale, dtype=f32, device=rois.device)
        start = _round_half_away(rois[:, lo]) * scale
        end = (_round_half_away(rois[:, hi]) + 1) * scale
        extent = torch.clamp(end - start, min=0.1)
        bin_size = extent / torch.tensor(float(self.group), dtype=f32)
        i = torch.arange(self.group, dtype=f32, device=rois.device)
        b0 = torch.floor(i[None] * bin_size[:, None] + start[:, None])
        b1 = torch.ceil((i[None] + 1) * bin_size[:, None] + start[:, None])
        return b0.long().clamp(0, size), b1.long().clamp(0, size)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, dim = self.group, self.output_dim
        rois = rois.detach().reshape(-1, 5).to(torch.float32)
        batch = rois[:, 0].long()                      # the fork's int conversion truncates
        if batch.numel() and bool(((batch < 0) | (batch >= n)).any()):
            raise self.error(f"a region's batch index is outside the batch of {n}")
        h0, h1 = self._bounds(rois, h, 2, 4)
        w0, w1 = self._bounds(rois, w, 1, 3)
        # Sums over bins from an integral image, accumulated in float64 (the fork adds the
        # bin's pixels one by one; a float32 running sum over the map would lose digits).
        acc = x.to(torch.float64)
        integral = torch.nn.functional.pad(acc.cumsum(2).cumsum(3), (1, 0, 1, 0))
        flat = integral.reshape(n * c, (h + 1) * (w + 1))
        chan = torch.arange(dim * k * k, device=x.device).view(1, dim, k, k)
        row = (batch.view(-1, 1, 1, 1) * c + chan).reshape(-1, dim, k, k)       # [R, D, k, k]
        y0, y1 = h0.view(-1, 1, k, 1), h1.view(-1, 1, k, 1)
        x0, x1 = w0.view(-1, 1, 1, k), w1.view(-1, 1, 1, k)

        def corner(yy, xx):
            index = (yy * (w + 1) + xx).expand_as(row)
            return flat[row.reshape(-1), index.reshape(-1)].view(row.shape)

        total = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
        area = ((y1 - y0) * (x1 - x0)).expand_as(row)
        empty = area <= 0
        out = torch.where(empty, torch.zeros_like(total), total / area.clamp(min=1).to(total.dtype))
        return out.to(x.dtype)


@register
class Reorg(Layer):
    """The YOLOv2 Caffe ports' Reorg (gklz1982/caffe-yolov2), which is Darknet's ``reorg``:
    ``reorg_param.stride`` s, ``reverse``.

    Not a plain space-to-depth. Forward, for each image of ``[C, H, W]`` (C a multiple of s²)
    the bottom's memory is read as ``[C/s², H·s, W·s]`` and element ``(k, j, i)`` of the top's
    memory, counted as ``[C, H, W]``, is element ``(k mod C/s², j·s + o // s, i·s + o mod s)``
    of it, ``o = k // (C/s²)``; the top is shaped ``[C·s², H/s, W/s]``. ``reverse`` applies
    the inverse permutation of that memory order and shapes the top ``[C/s², H·s, W·s]``. The
    gradient is the transposed permutation (Darknet's backward; gklz1982's reads an unused
    buffer and leaves zeros, not reproduced).
    """

    type = "Reorg"
    family = "common"
    origin = "the YOLOv2 Caffe ports"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.reorg_param
        if not p.HasField("stride") or p.stride <= 0:
            raise self.error("reorg_param.stride must be set and positive")
        self.stride, self.reverse = int(p.stride), bool(p.reverse)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        s = self.stride
        if len(shape) != 4:
            raise self.error(f"needs a 4-D bottom, got {list(shape)}")
        n, c, h, w = shape
        if c % (s * s):
            raise self.error(f"channels ({c}) must be a multiple of stride² ({s * s})")
        if self.reverse:
            return [(n, c // (s * s), h * s, w * s)]
        if h % s or w % s:
            raise self.error(f"height and width ({h}, {w}) must be multiples of stride ({s})")
        return [(n, c * s * s, h // s, w // s)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.stride
        top = self.top_shapes([tuple(x.shape)])[0]
        if self.reverse:
            parts = x.reshape(n, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            parts = x.reshape(n, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return parts.reshape(top)
