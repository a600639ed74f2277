"""SSD's feature layers (weiliu89/caffe branch ``ssd``): Normalize, Permute, PriorBox.

DetectionOutput, the decoding and NMS head, is in ``ssd_detection.py``.

Normalize (``normalize_layer.cpp``) divides each sample by its L2 norm, either over the whole
``C×H×W`` sample (``across_spatial``) or over the channels at each position, with ``eps`` added
to the sum of squares before the square root, then multiplies by a learned scale: one value
(``channel_shared``, a 0-D blob) or one per channel. Its backward is SSD's (see
``_NormalizeFunction``: not the exact gradient when the scale is per channel).
A ``Normalize`` layer that sets ``normalize_param`` is happynear/caffe-windows' parameter-free
version of the same type name instead (``cw_normalize.py``).

Permute reorders axes; axes ``order`` leaves out follow in their old order.

PriorBox emits, for every cell of bottom 0 (row-major) and every ``min_size``, the box
``min_size`` square, then (with ``max_size``) the square of side ``sqrt(min·max)``, then one box
per aspect ratio ``r != 1``: ``min·sqrt(r) × min/sqrt(r)``. Sizes are truncated to integers (SSD
stores them in ``int``). Corners are divided by the image size; channel 1 holds the variances.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.fillers import fill
from caffe_compat.engine.layers import cw_normalize
from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.proto import caffe_pb2

SSD = "weiliu89/caffe branch ssd"
log = logging.getLogger(__name__)


def _legacy_chw(shape: Shape) -> tuple[int, int, int]:
    """Caffe's channels(), height(), width() of a blob (missing axes count as 1)."""
    padded = tuple(shape) + (1,) * (4 - len(shape))
    return padded[1], padded[2], padded[3]


@register
class Normalize(Layer):
    """SSD's L2 normalisation with a learned scale (blob 0: ``[]`` shared or ``[C]``), or
    happynear/caffe-windows' parameter-free one when the layer sets ``normalize_param``
    (``cw_normalize.py``). Both forks register this type name; neither parameter set is
    SSD's, as before caffe-windows' was added, with a warning (AM-Softmax's published
    ``face_train_test.prototxt`` writes a bare ``Normalize`` for caffe-windows' layer)."""

    type = "Normalize"
    origin = f"{SSD} and {cw_normalize.ORIGIN}"
    num_tops = (1, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.windows = None
        if param.HasField("normalize_param"):
            self.windows = cw_normalize.CaffeWindowsNorm(self, param, tuple(bottom_shapes[0]))
            return
        if not param.HasField("norm_param"):
            log.warning("layer '%s' (Normalize) sets neither norm_param nor normalize_param: "
                        "built as SSD's Normalize, with a learnable scale; a "
                        "happynear/caffe-windows net (AM-Softmax) must add normalize_param {} "
                        "to get its parameter-free L2 normalisation", self.name)
        self._init_ssd(param, bottom_shapes)

    def _init_ssd(self, param, bottom_shapes: Sequence[Shape]) -> None:
        p = param.norm_param
        if len(bottom_shapes[0]) < 2:
            raise self.error(f"the bottom needs at least 2 axes, got {list(bottom_shapes[0])}")
        if len(param.top) > 1:
            raise self.error("SSD's Normalize has one top; the norm top is caffe-windows' "
                             "(set normalize_param)")
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = float(p.eps)
        channels = bottom_shapes[0][1]
        filler = (p.scale_filler if p.HasField("scale_filler")
                  else caffe_pb2.FillerParameter(type="constant", value=1.0))
        shape = () if self.channel_shared else (channels,)
        self.add_blob(fill(filler, shape))

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        if self.windows is not None:
            return self.windows.top_shapes(tuple(bottom_shapes[0]))
        return [tuple(bottom_shapes[0])]

    def forward(self, x: torch.Tensor):
        if self.windows is not None:
            return self.windows.forward(x)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        scale = self.blobs[0].reshape(1, -1, 1)        # [1, 1, 1] shared or [1, C, 1]
        out = _NormalizeFunction.apply(flat, scale, self.across_spatial, self.eps)
        return out.reshape(x.shape)


class _NormalizeFunction(torch.autograd.Function):
    """SSD's Normalize with SSD's backward.

    With ``u = x / norm`` and ``y = s * u``, SSD's bottom diff is
    ``s * (dy - x * sum(x * dy) / norm^2) / norm``: the scale multiplies after the projection
    instead of before. For a shared scale that is the exact gradient; with one scale per
    channel it is not, and Caffe's value is what trained SSD models saw, so it is kept.
    The scale's diff ``sum(u * dy)`` (per channel) is exact.
    """

    @staticmethod
    def forward(ctx, flat, scale, across_spatial: bool, eps: float):
        dims = (1, 2) if across_spatial else (1,)
        norm = torch.sqrt(flat.square().sum(dim=dims, keepdim=True) + eps)
        unit = flat / norm
        ctx.save_for_backward(flat, scale, norm, unit)
        ctx.dims = dims
        return unit * scale

    @staticmethod
    def backward(ctx, dy):
        flat, scale, norm, unit = ctx.saved_tensors
        along = (flat * dy).sum(dim=ctx.dims, keepdim=True)
        dx = scale * (dy - flat * along / norm.square()) / norm
        dscale = (unit * dy).sum(dim=(0, 2), keepdim=True)
        if scale.shape[1] == 1:
            dscale = dscale.sum(dim=1, keepdim=True)
        return dx, dscale, None, None


@register
class Permute(Layer):
    """Reorder axes as ``permute_param.order`` says (unlisted axes keep their order, last)."""

    type = "Permute"
    origin = SSD

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        axes = len(bottom_shapes[0])
        order: list[int] = []
        for o in param.permute_param.order:
            if o >= axes:
                raise self.error(f"order {o} is out of range for a {axes}-axis bottom")
            if o in order:
                raise self.error(f"order lists axis {o} twice")
            order.append(int(o))
        order += [a for a in range(axes) if a not in order]
        self.order = tuple(order)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0][a] for a in self.order)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == tuple(range(x.dim())):
            return x.clone()
        return x.permute(*self.order).contiguous()


def _ssd_aspect_ratios(ratios: Sequence[float], flip: bool) -> list[float]:
    """1 first, then each new ratio (and 1/ratio with flip), skipping near-duplicates."""
    out = [1.0]
    for ar in ratios:
        ar = float(np.float32(ar))
        if any(abs(ar - seen) < 1e-6 for seen in out):
            continue
        out.append(ar)
        if flip:  # as a C double: 1/0 is inf, not an error
            with np.errstate(divide="ignore"):
                out.append(float(np.float32(np.float64(1.0) / ar)))
    return out


@register
class PriorBox(Layer):
    """SSD's default boxes for one feature map; top ``[1, 2, H·W·num_priors·4]``."""

    type = "PriorBox"
    origin = SSD
    num_bottoms = (2, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param needs min_size")
        # SSD checks the sizes as floats and truncates each to an int only when it uses it.
        if not all(s > 0 for s in p.min_size):
            raise self.error("min_size must be positive")
        if p.max_size and len(p.max_size) != len(p.min_size):
            raise self.error("give one max_size per min_size")
        for lo, hi in zip(p.min_size, p.max_size):
            if not hi > lo:
                raise self.error(f"max_size ({hi:g}) must be greater than min_size ({lo:g})")
        self.min_sizes = [int(s) for s in p.min_size]
        self.max_sizes = [int(s) for s in p.max_size]
        self.aspect_ratios = _ssd_aspect_ratios(p.aspect_ratio, p.flip)
        self.num_priors = len(self.aspect_ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.clip = p.clip
        if len(p.variance) not in (0, 1, 4):
            raise self.error(f"give one or four variances, not {len(p.variance)}")
        self.variance = [float(v) for v in p.variance] or [0.1]
        if not all(v > 0 for v in self.variance):
            raise self.error("variances must be positive")
        self.img_hw = self._pair(p, "img_size", "img_h", "img_w", int)
        self.step_hw = self._pair(p, "step", "step_h", "step_w", float)
        self.offset = float(np.float32(p.offset))
        self._cached: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _pair(self, p, single: str, h: str, w: str, kind) -> tuple:
        """``(h, w)`` from ``h``/``w`` (both then needed, as SSD reads an unset one as 0 and
        refuses it) or ``single``; ``(0, 0)``, meaning "from the bottoms", when none is set."""
        if p.HasField(h) or p.HasField(w):
            if p.HasField(single):
                raise self.error(f"give either {single} or {h}/{w}, not both")
            names = (h, w)
        elif p.HasField(single):
            names = (single, single)
        else:
            return kind(0), kind(0)
        for name in names:
            if not getattr(p, name) > 0:
                raise self.error(f"{name} must be greater than 0, got {getattr(p, name):g}")
        return kind(getattr(p, names[0])), kind(getattr(p, names[1]))

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        _, h, w = _legacy_chw(bottom_shapes[0])
        return [(1, 2, h * w * self.num_priors * 4)]

    def _boxes(self, feat_hw: tuple[int, int], img_hw: tuple[int, int]) -> np.ndarray:
        """The ``[2, H·W·P·4]`` array, in SSD's float32/double mix."""
        f32 = np.float32
        layer_h, layer_w = feat_hw
        img_h, img_w = self.img_hw if 0 not in self.img_hw else img_hw
        if 0 in self.step_hw:
            step_h, step_w = f32(img_h) / f32(layer_h), f32(img_w) / f32(layer_w)
        else:
            step_h, step_w = f32(self.step_hw[0]), f32(self.step_hw[1])
        sizes = []                                     # (width, height) per prior, float32
        for s, lo in enumerate(self.min_sizes):
            sizes.append((f32(lo), f32(lo)))
            if self.max_sizes:
                side = f32(math.sqrt(lo * self.max_sizes[s]))
                sizes.append((side, side))
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                with np.errstate(divide="ignore", invalid="ignore"):  # ratio 0 or < 0: as C
                    root = np.sqrt(f32(ar))
                    sizes.append((f32(lo) * root, f32(lo) / root))
        wh = np.array(sizes, dtype=np.float64)                               # [P, 2]
        cx = ((np.arange(layer_w, dtype=f32) + f32(self.offset)) * step_w).astype(np.float64)
        cy = ((np.arange(layer_h, dtype=f32) + f32(self.offset)) * step_h).astype(np.float64)
        cy, cx = np.meshgrid(cy, cx, indexing="ij")                          # [H, W]
        cx, cy = cx[..., None], cy[..., None]
        half_w, half_h = wh[:, 0] / 2.0, wh[:, 1] / 2.0
        boxes = np.stack([(cx - half_w) / img_w, (cy - half_h) / img_h,
                          (cx + half_w) / img_w, (cy + half_h) / img_h], axis=-1)
        boxes = boxes.astype(np.float32).reshape(-1)
        if self.clip:
            boxes = np.clip(boxes, 0.0, 1.0)
        variances = np.resize(np.asarray(self.variance, dtype=np.float32), boxes.size)
        return np.stack([boxes, variances])

    def forward(self, feat: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        _, fh, fw = _legacy_chw(tuple(feat.shape))
        _, ih, iw = _legacy_chw(tuple(image.shape))
        # The boxes depend on the two shapes only: computed once per pair of shapes (the last
        # pair kept), and copied out so that a write into the top cannot reach the cache.
        key = (fh, fw, ih, iw)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, torch.from_numpy(self._boxes((fh, fw), (ih, iw))).unsqueeze(0))
        return self._cached[1].to(device=feat.device, dtype=feat.dtype, copy=True)
