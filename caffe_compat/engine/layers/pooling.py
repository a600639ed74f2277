"""Pooling (``pooling_layer.cpp``, ``.cu``): MAX, AVE and STOCHASTIC over 4-D ``(N, C, H, W)``.

Caffe's output size per spatial axis (``round_mode`` CEIL by default, FLOOR uses floor; the
DenseNet/ResNeXt ports' ``ceil_mode: false`` is FLOOR too)::

    out = ceil((H + 2p - k) / s) + 1
    if (pad_h or pad_w) and (out - 1) * s >= H + p:  out -= 1     # only when padded

Windows start at ``o*s - p``. MAX clips each window to the image (padding never wins,
ties go to the first element in row-major order); a window with no image pixel gives
``-FLT_MAX`` and mask ``-1``. AVE sums the in-image pixels and divides by
``(min(hs+k, H+p) - hs) * (min(ws+k, W+p) - ws)``, computed before clipping to the image.

That is torch's ``max_pool2d`` / ``avg_pool2d(count_include_pad=True)`` with
``ceil_mode = (round_mode == CEIL)`` whenever torch produces the same output size and
accepts the padding (torch wants ``pad <= k/2``, Caffe only ``pad < k``). Otherwise
(unpadded CEIL pooling whose last window starts past the image, which torch drops, or a
large pad) we pad explicitly and pool with no implicit padding, reproducing Caffe's values.

STOCHASTIC (``pooling_layer.cu``; Caffe's CPU build has none) takes no padding; windows
start at ``o*s`` and are clipped to the image. TEST gives ``sum(x^2) / sum(x)`` where
``sum(x) > 0``, else 0; TRAIN draws ``u`` in (0, 1] per window and outputs the first element
in row-major order whose running sum reaches ``u * sum(x)`` (0 if none does), its gradient
going to that element only. Caffe's backward after a TEST forward reads stale sample
indices; here it is the derivative of the TEST formula.

Not reproduced: Caffe's MAX skips NaN (``NaN > v`` is false) where torch propagates it, and
Caffe's backward writes the diff of a mask -1 window out of bounds; here it goes nowhere.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import TRAIN, Layer, Shape, register
from caffe_compat.formats.budget import check_shape
from caffe_compat.formats.coords import inverse, window_map
from caffe_compat.formats.errors import ResourceError
from caffe_compat.engine.layers import fast_forms

MAX, AVE, STOCHASTIC = 0, 1, 2
CEIL, FLOOR = 0, 1
FLT_MAX = float(torch.finfo(torch.float32).max)  # Caffe starts MAX windows at -FLT_MAX (any Dtype)


def _caffe_out(size: int, k: int, p: int, s: int, ceil: bool, any_pad: bool) -> int:
    """Caffe's pooled size along one axis."""
    span = size + 2 * p - k
    out = (math.ceil(span / s) if ceil else math.floor(span / s)) + 1
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def _torch_out(size: int, k: int, p: int, s: int, ceil: bool) -> int:
    """torch's pooled size along one axis (pooling_output_shape in ATen)."""
    span = size + 2 * p - k
    out = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


@register
class Pooling(Layer):
    """Caffe Pooling: MAX (optional argmax-mask top), AVE or STOCHASTIC."""

    type = "Pooling"
    specialized = fast_forms.max_pool      # a batch-1 forward without per-call work
    num_tops = (1, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        pp = param.pooling_param
        self.pool = pp.pool
        if self.pool not in (MAX, AVE, STOCHASTIC):
            raise self.error(f"unknown pool method {self.pool} (known: MAX, AVE, STOCHASTIC)")
        self.draws_random = self.pool == STOCHASTIC and phase == TRAIN
        if len(param.top) > 1 and self.pool != MAX:
            raise self.error("only MAX pooling has a second (argmax mask) top")

        has_k, has_kh, has_kw = (pp.HasField(f) for f in ("kernel_size", "kernel_h", "kernel_w"))
        self.global_pooling = pp.global_pooling
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                raise self.error("with global_pooling: true the kernel size comes from the "
                                 "bottom; remove kernel_size/kernel_h/kernel_w")
        else:
            if has_k and (has_kh or has_kw):
                raise self.error("give either kernel_size or kernel_h and kernel_w, not both")
            if not has_k and not (has_kh and has_kw):
                raise self.error("kernel_size (or both kernel_h and kernel_w) is required")
        if pp.HasField("pad") and (pp.HasField("pad_h") or pp.HasField("pad_w")):
            raise self.error("give either pad or pad_h and pad_w, not both")
        if pp.HasField("pad_h") != pp.HasField("pad_w"):
            raise self.error("pad_h and pad_w must be given together")
        if pp.HasField("stride") and (pp.HasField("stride_h") or pp.HasField("stride_w")):
            raise self.error("give either stride or stride_h and stride_w, not both")
        if pp.HasField("stride_h") != pp.HasField("stride_w"):
            raise self.error("stride_h and stride_w must be given together")

        self.kernel = (None if self.global_pooling else
                       (pp.kernel_size, pp.kernel_size) if has_k else (pp.kernel_h, pp.kernel_w))
        self.pad = (pp.pad, pp.pad) if pp.HasField("pad") else (pp.pad_h, pp.pad_w)
        self.stride = (pp.stride, pp.stride) if pp.HasField("stride") else (
            (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (1, 1))
        if self.kernel is not None and min(self.kernel) <= 0:
            raise self.error(f"kernel size must be positive, got {list(self.kernel)}")
        if min(self.stride) <= 0:
            raise self.error(f"stride must be positive, got {list(self.stride)}")
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise self.error("with global_pooling: true only pad 0 and stride 1 are allowed "
                             f"(got pad {list(self.pad)}, stride {list(self.stride)})")
        if self.pool == STOCHASTIC and self.pad != (0, 0):
            raise self.error("padding is implemented only for MAX and AVE pooling, not "
                             f"STOCHASTIC (got pad {list(self.pad)})")
        if self.kernel is not None:
            for axis, p, k in zip("hw", self.pad, self.kernel):
                if p >= k:
                    raise self.error(f"pad_{axis} ({p}) must be smaller than kernel_{axis} ({k})")
        # BVLC's round_mode and the DenseNet/ResNeXt ports' ceil_mode say the same thing.
        if pp.HasField("ceil_mode") and pp.HasField("round_mode") and \
                pp.ceil_mode != (pp.round_mode == CEIL):
            raise self.error("round_mode and ceil_mode disagree; give one of them")
        self.ceil = pp.round_mode == CEIL and pp.ceil_mode
        self.top_shapes(bottom_shapes)

    # -- shapes ---------------------------------------------------------------------------
    def _kernel_for(self, shape: Shape) -> tuple[int, int]:
        return (shape[2], shape[3]) if self.global_pooling else self.kernel

    def _out_hw(self, shape: Shape) -> tuple[int, int]:
        k = self._kernel_for(shape)
        any_pad = self.pad != (0, 0)
        return tuple(_caffe_out(shape[2 + i], k[i], self.pad[i], self.stride[i], self.ceil,
                                any_pad) for i in range(2))

    def fresh_output(self, num_bottoms: int) -> bool:
        return True                          # F.max_pool / F.avg_pool make a new tensor

    def coord_map(self):
        # Global pooling has no fixed window: its output does not sit anywhere on the input.
        return None if self.global_pooling else inverse(window_map(1, self.stride, self.kernel,
                                                                   self.pad))

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), "
                             f"got shape {list(shape)}")
        out = self._out_hw(shape)
        if min(out) <= 0:
            raise self.error(f"output size {list(out)} is empty for input {list(shape[2:])} "
                             f"(kernel {list(self._kernel_for(shape))}, pad {list(self.pad)}, "
                             f"stride {list(self.stride)})")
        top = (*shape[:2], *out)
        return [top] * max(1, len(self.param.top))

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        k = self._kernel_for(tuple(x.shape))
        out = self._out_hw(tuple(x.shape))
        fused = all(self.pad[i] * 2 <= k[i]
                    and _torch_out(x.shape[2 + i], k[i], self.pad[i], self.stride[i], self.ceil)
                    == out[i] for i in range(2))
        if self.pool == AVE:
            return self._ave(x, k, out, fused)
        if self.pool == STOCHASTIC:
            return self._stochastic(x, k, out)
        return self._max(x, k, out, fused, want_mask=len(self.param.top) > 1)

    def _explicit_pad(self, x: torch.Tensor, k, out, value: float) -> torch.Tensor:
        """Pad so that every Caffe window lies inside: left pad p, right up to the end of the
        last window (a negative right pad crops rows no window reaches). (N, C, Hp, Wp)"""
        right = [(out[i] - 1) * self.stride[i] + k[i] - self.pad[i] - x.shape[2 + i]
                 for i in range(2)]
        padded = (*x.shape[:2], x.shape[2] + self.pad[0] + right[0],
                  x.shape[3] + self.pad[1] + right[1])
        try:  # a huge stride with ceil rounding pads by about one stride (stride: 100000)
            check_shape(padded, "padded input", x.element_size())
        except ResourceError as exc:
            raise self.error(str(exc)) from None
        return F.pad(x, (self.pad[1], right[1], self.pad[0], right[0]), value=value)

    def _ave(self, x: torch.Tensor, k, out, fused: bool) -> torch.Tensor:
        if fused:
            return F.avg_pool2d(x, k, self.stride, self.pad, ceil_mode=self.ceil,
                                count_include_pad=True)
        xp = self._explicit_pad(x, k, out, 0.0)
        total = F.avg_pool2d(xp, k, self.stride, divisor_override=1)  # window sums
        return total / self._ave_divisor(x.shape[2], x.shape[3], k, out, x)

    def _max(self, x: torch.Tensor, k, out, fused: bool, want_mask: bool):
        # indices only for a mask top: without them an inference forward takes torch's
        # plain max pooling (autograd keeps its own for backward either way)
        if fused:
            y = F.max_pool2d(x, k, self.stride, self.pad, ceil_mode=self.ceil,
                             return_indices=want_mask)
        else:
            # -inf padding never wins, as Caffe clips windows to the image.
            xp = self._explicit_pad(x, k, out, -math.inf)
            y = F.max_pool2d(xp, k, self.stride, return_indices=want_mask)
        if want_mask:
            y, idx = y
            if not fused:  # padded flat index -> Caffe's in-channel index h*W + w
                Wp, W = xp.shape[3], x.shape[3]
                idx = ((torch.div(idx, Wp, rounding_mode="floor") - self.pad[0]) * W
                       + idx % Wp - self.pad[1])
        # Caffe keeps -FLT_MAX (mask -1) where no element beats it: empty windows and
        # all -inf windows. Clamp's gradient is 0 there, like Caffe's missing argmax.
        # Under bf16/fp16 autocast -FLT_MAX is not representable: the dtype's lowest stands in.
        lowest = max(-FLT_MAX, float(torch.finfo(y.dtype).min))
        y = y.clamp(min=lowest)
        if not want_mask:
            return y
        # The mask holds flat indices: at least fp32, since bf16 is exact only up to 256.
        mask_dtype = torch.promote_types(x.dtype, torch.float32)
        return y, torch.where(y > lowest, idx, torch.full_like(idx, -1)).to(mask_dtype)

    def _stochastic(self, x: torch.Tensor, k, out) -> torch.Tensor:
        n, c = x.shape[:2]
        # Zeros after the image: a window's running sum is flat there, so a zero past the
        # image is picked only in a window with no image pixel (output 0, gradient nowhere).
        xp = self._explicit_pad(x, k, out, 0.0)
        cols = F.unfold(xp.reshape(n * c, 1, *xp.shape[2:]), k, stride=self.stride)
        running = cols.cumsum(1)                  # (N*C, kh*kw, windows), row-major in each
        total = running[:, -1]
        if self.phase == TRAIN:
            threshold = (1.0 - torch.rand_like(total)) * total     # curand's u is in (0, 1]
            reached = running >= threshold.unsqueeze(1)
            first = reached.to(torch.uint8).argmax(1, keepdim=True)
            top = torch.where(reached.any(1), cols.gather(1, first).squeeze(1), 0.0)
        else:
            positive = total > 0
            top = torch.where(positive, (cols * cols).sum(1) / total.masked_fill(~positive, 1.0),
                              0.0)
        return top.reshape(n, c, *out)

    def _ave_divisor(self, H: int, W: int, k, out, like: torch.Tensor) -> torch.Tensor:
        """Caffe's per-window pool_size, shape (out_h, out_w); may be 0 or negative for a
        window that starts past the image (Caffe then divides 0 by it: NaN or -0)."""
        sizes = []
        for i, size in enumerate((H, W)):
            start = torch.arange(out[i], device=like.device, dtype=like.dtype) * self.stride[i] \
                - self.pad[i]
            end = torch.clamp(start + k[i], max=size + self.pad[i])
            sizes.append(end - start)
        return sizes[0][:, None] * sizes[1][None, :]

    def extra_repr(self) -> str:
        kind = ("MAX", "AVE", "STOCHASTIC")[self.pool]
        kernel = "global" if self.global_pooling else list(self.kernel)
        return (f"name={self.name!r}, {kind}, kernel={kernel}, stride={list(self.stride)}, "
                f"pad={list(self.pad)}, round_mode={'CEIL' if self.ceil else 'FLOOR'}")


@register
class SPP(Layer):
    """Caffe SPP (``spp_layer.cpp``): spatial pyramid pooling, levels flattened and concatenated.

    Level ``l`` has ``b = 2**l`` bins per axis: a Caffe Pooling with kernel ``ceil(H / b)``,
    stride = kernel and pad ``(kernel * b - H + 1) // 2`` (same for W). With
    ``pyramid_height: 1`` the top is that one pooling's ``(N, C, 1, 1)``; otherwise it is
    ``(N, C * sum(b**2))``.
    """

    type = "SPP"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        sp = param.spp_param
        self.height = sp.pyramid_height
        self.pool = sp.pool
        if self.height < 1:
            raise self.error("spp_param.pyramid_height must be at least 1")
        if self.pool not in (MAX, AVE, STOCHASTIC):
            raise self.error(f"unknown pool method {self.pool} (known: MAX, AVE, STOCHASTIC)")
        # STOCHASTIC levels take no padding: Caffe accepts only maps each level's bins divide.
        self.draws_random = self.pool == STOCHASTIC and phase == TRAIN
        self._levels: dict[tuple[int, int], list[Pooling]] = {}
        self.top_shapes(bottom_shapes)

    def _poolings(self, h: int, w: int) -> list["Pooling"]:
        """One Caffe Pooling per pyramid level for an ``h``×``w`` input (cached per size)."""
        if (h, w) not in self._levels:
            from caffe_compat.proto import caffe_pb2
            levels = []
            for level in range(self.height):
                bins = 2 ** level
                kh, kw = math.ceil(h / bins), math.ceil(w / bins)
                lp = caffe_pb2.LayerParameter(name=f"{self.name}/level{level}", type="Pooling")
                pp = lp.pooling_param
                pp.pool = self.pool
                pp.kernel_h, pp.kernel_w, pp.stride_h, pp.stride_w = kh, kw, kh, kw
                pp.pad_h, pp.pad_w = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
                levels.append(Pooling(lp, [(1, 1, h, w)], self.phase))
            self._levels[(h, w)] = levels
        return self._levels[(h, w)]

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4 or min(shape[2:]) <= 0:
            raise self.error(f"bottom must be (num, channels, height, width) with a non-empty "
                             f"image, got {list(shape)}")
        levels = [p.top_shapes([shape])[0] for p in self._poolings(shape[2], shape[3])]
        if self.height == 1:
            return [levels[0]]
        return [(shape[0], sum(math.prod(s[1:]) for s in levels))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self._poolings(x.shape[2], x.shape[3])
        if self.height == 1:
            return levels[0](x)
        return torch.cat([p(x).flatten(1) for p in levels], dim=1)

