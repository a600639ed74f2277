"""Resizing layers from the forks: SegNet's Upsample (max-unpooling) and PSPNet's Interp.

Upsample (alexgkendall/caffe-segnet ``upsample_layer.cpp``) takes the pooled values and the
argmax mask of a MAX Pooling layer's second top and writes each value back at its index in a
zero map of ``upsample_h × upsample_w`` (default ``H·scale - pad_out_h`` by ``W·scale -
pad_out_w``). When two values share an index the later one wins, as in SegNet's loop; its
backward gives every bottom element the top diff at its index (so both get it).

Interp (hszhao/PSPNet ``interp_layer.cpp`` / ``util/interp.cpp``, from DeepLab v2) is
bilinear resizing with corners aligned: output pixel ``o`` reads input ``o·(in-1)/(out-1)``
(the ratio in float32), with weights ``h1r - floor(h1r)``. Output size: ``zoom_factor``
gives ``in + (in-1)(zoom-1)``, ``shrink_factor`` ``(in-1)/shrink + 1`` (both: shrink then
zoom), else ``height``/``width``. ``pad_beg``/``pad_end`` may only crop (≤ 0), as in PSPNet.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register

SEGNET = "alexgkendall/caffe-segnet"


class _Unpool(torch.autograd.Function):
    """Scatter with "last write wins"; backward gathers the top diff at each index."""

    @staticmethod
    def forward(ctx, x, index, out_hw: int):
        n, c = x.shape[0], x.shape[1]
        flat = x.reshape(n, c, -1)
        idx = index.reshape(n, c, -1)
        order = torch.arange(flat.shape[2], device=x.device).expand_as(idx).contiguous()
        winner = torch.full((n, c, out_hw), -1, dtype=torch.long, device=x.device)
        winner.scatter_reduce_(2, idx, order, reduce="amax", include_self=True)
        values = flat.gather(2, winner.clamp(min=0))
        out = torch.where(winner >= 0, values, torch.zeros_like(values))
        ctx.save_for_backward(idx)
        ctx.in_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        return dy.gather(2, idx).reshape(ctx.in_shape), None, None


@register
class Upsample(Layer):
    """SegNet's max-unpooling: bottoms (pooled values, MAX Pooling mask), one top."""

    type = "Upsample"
    origin = SEGNET
    num_bottoms = (2, 2)
    no_grad_bottoms = (1,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.upsample_param
        self.size = None
        if p.HasField("upsample_h") and p.HasField("upsample_w"):
            self.size = (int(p.upsample_h), int(p.upsample_w))
            if min(self.size) <= 1:
                raise self.error("upsample_h and upsample_w must be greater than 1")
        elif p.HasField("scale_h") != p.HasField("scale_w") or (
                p.HasField("scale_h") and p.HasField("scale")):
            raise self.error("give upsample_h and upsample_w, or scale, or scale_h and scale_w")
        self.scale = ((int(p.scale_h), int(p.scale_w)) if p.HasField("scale_h")
                      else (int(p.scale), int(p.scale)))
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        if self.size is None:
            if min(self.scale) <= 1:
                raise self.error("the upsampling scale must be greater than 1")
            for axis, pad, s in zip("hw", self.pad_out, self.scale):
                if pad and s != 2:
                    raise self.error(f"pad_out_{axis} needs scale_{axis} 2")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        x, mask = (tuple(s) for s in bottom_shapes)
        if len(x) != 4 or x != mask:
            raise self.error(f"bottoms must be 4-D and of one shape, got {list(x)} and {list(mask)}")
        h, w = self.size or (x[2] * self.scale[0] - self.pad_out[0],
                             x[3] * self.scale[1] - self.pad_out[1])
        return [(x[0], x[1], h, w)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, _, h, w = self.top_shapes([tuple(x.shape), tuple(mask.shape)])[0]
        index = mask.detach().to(torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= h * w):
            raise self.error(f"mask index {int(index.max())} is outside the {h}×{w} output; "
                             "check that the scale matches the pooling layer that made the mask")
        return _Unpool.apply(x, index, h * w).reshape(x.shape[0], x.shape[1], h, w)


def _axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSPNet's per-output (index, next-index step, lambda) along one axis, float32 maths."""
    ratio = (np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1
             else np.float32(0))
    pos = (ratio * np.arange(size_out, dtype=np.float32)).astype(np.float32)
    base = pos.astype(np.int64)                     # C's float -> int truncation (pos >= 0)
    step = (base < size_in - 1).astype(np.int64)
    lam = (pos - base.astype(np.float32)).astype(np.float32)
    return base, step, lam


@register
class Interp(Layer):
    """PSPNet/DeepLab bilinear interpolation (align corners) with their output-size rules."""

    type = "Interp"
    origin = "hszhao/PSPNet and DeepLab v2"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.interp_param
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error("pad_beg and pad_end must be <= 0 (PSPNet's Interp only crops)")
        has_zoom, has_shrink = p.HasField("zoom_factor"), p.HasField("shrink_factor")
        if not (has_zoom or has_shrink or (p.HasField("height") and p.HasField("width"))):
            raise self.error("give zoom_factor, shrink_factor, or height and width")
        self.zoom = int(p.zoom_factor) if has_zoom else None
        self.shrink = int(p.shrink_factor) if has_shrink else None
        if (self.zoom is not None and self.zoom < 1) or (self.shrink is not None and self.shrink < 1):
            raise self.error("zoom_factor and shrink_factor must be at least 1")
        self.hw = (int(p.height), int(p.width))
        self.top_shapes(bottom_shapes)

    def _out_size(self, size_eff: int, i: int) -> int:
        if self.zoom is None and self.shrink is None:
            return self.hw[i]
        out = size_eff if self.shrink is None else (size_eff - 1) // self.shrink + 1
        return out if self.zoom is None else out + (out - 1) * (self.zoom - 1)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        x = tuple(bottom_shapes[0])
        if len(x) != 4:
            raise self.error(f"the bottom must be 4-D, got {list(x)}")
        eff = [x[2 + i] + self.pad_beg + self.pad_end for i in range(2)]
        out = [self._out_size(eff[i], i) for i in range(2)]
        if min(eff) <= 0 or min(out) <= 0:
            raise self.error(f"output {out} from input {list(x[2:])} (cropped to {eff}) is empty")
        return [(x[0], x[1], out[0], out[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, oh, ow = self.top_shapes([tuple(x.shape)])[0]
        b = -self.pad_beg
        crop = x[:, :, b:x.shape[2] + self.pad_end, b:x.shape[3] + self.pad_end]
        ih, iw = crop.shape[2], crop.shape[3]
        if (ih, iw) == (oh, ow):
            return crop.clone()
        hb, hs, hl = (torch.from_numpy(a).to(x.device) for a in _axis_weights(ih, oh))
        wb, ws, wl = (torch.from_numpy(a).to(x.device) for a in _axis_weights(iw, ow))
        hl, wl = hl.to(x.dtype).view(-1, 1), wl.to(x.dtype).view(1, -1)
        rows0, rows1 = crop[:, :, hb], crop[:, :, hb + hs]
        top = (1 - wl) * rows0[..., wb] + wl * rows0[..., wb + ws]
        bottom = (1 - wl) * rows1[..., wb] + wl * rows1[..., wb + ws]
        return (1 - hl) * top + hl * bottom
