"""lmb-freiburg/flownet2's layers for its FlowNet 2.0 deploy nets: Correlation, FlowWarp,
ChannelNorm and Accum (``Resample`` is in ``flownet_resample.py``).

The fork computes Correlation only on the GPU (its CPU functions are NOT_IMPLEMENTED); the
others follow its CPU code. Sums run in the bottom's dtype, in torch's order, not the fork's.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.proto import caffe_pb2

FLOWNET2 = "lmb-freiburg/flownet2"
_CHANNEL_NORM_EPS = 1e-9   # the fork's backward divides by norm + 1e-9


def _four_axes(layer: Layer, shape: Shape, what: str) -> tuple[int, int, int, int]:
    if len(shape) > 4:
        raise layer.error(f"{what} must have at most 4 axes, got shape {list(shape)}")
    return legacy_shape(shape)


@register
class Correlation(Layer):
    """FlowNetC's patch correlation of bottom 0 with bottom 1 (``correlation_param``).

    Both bottoms (same shape ``[N, C, H, W]``) are zero-padded by ``pad``. Top channel
    ``(p + R)·G + (o + R)`` (``R = max_displacement / stride_2``, ``G = 2R + 1``) at (y, x)
    compares the ``kernel_size`` square of bottom 0 with top-left corner
    ``(y·stride_1 + max_displacement, x·stride_1 + max_displacement)`` (padded coordinates)
    with the square of bottom 1 displaced by ``(p·stride_2, o·stride_2)``: MULTIPLY the mean
    of their products, SUBTRACT the mean of ``|a − b|``, over the ``k²·C`` values. Top side
    ``ceil((side + 2·pad − 2·(max_displacement + k // 2)) / stride_1)``, at least 1.
    Gradient: MULTIPLY's is the fork's (exact); SUBTRACT's is autograd's of ``|a − b|``
    (sign 0 at a tie where the fork's takes +1; its SUBTRACT backward kernels also index
    the padded channel-last copy with channel-first offsets, not reproduced).
    ``single_direction`` belongs to Correlation1D and is refused here; ``do_abs`` is read by
    no fork kernel and is refused rather than ignored.
    """

    type = "Correlation"
    origin = FLOWNET2
    num_bottoms = (2, 2)
    exports_to_onnx = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.correlation_param
        if not p.HasField("kernel_size") or not p.HasField("max_displacement"):
            raise self.error("correlation_param needs kernel_size and max_displacement "
                             "(the fork CHECKs both)")
        if p.kernel_size % 2 == 0:
            raise self.error(f"kernel_size must be odd, got {p.kernel_size}")
        if p.stride_1 < 1 or p.stride_2 < 1:
            raise self.error(f"stride_1 and stride_2 must be >= 1, got {p.stride_1}, "
                             f"{p.stride_2}")
        if p.do_abs:
            raise self.error("do_abs is not supported (no kernel of the fork reads it)")
        if p.single_direction and self.type == "Correlation":
            raise self.error("single_direction is Correlation1D's field")
        self.kernel, self.max_disp, self.pad = p.kernel_size, p.max_displacement, p.pad
        self.stride1, self.stride2 = p.stride_1, p.stride_2
        self.subtract = p.correlation_type == caffe_pb2.CorrelationParameter.SUBTRACT
        self.radius = self.max_disp // self.stride2
        self.direction = int(p.single_direction)
        if self.direction not in (-1, 0, 1):
            raise self.error(f"single_direction must be -1, 0 or 1, got {self.direction}")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        a = _four_axes(self, bottom_shapes[0], "bottom 0")
        b = _four_axes(self, bottom_shapes[1], "bottom 1")
        if a[1:] != b[1:] or a[0] != b[0]:
            raise self.error(f"both bottoms must have the same shape, got {list(a)} and "
                             f"{list(b)}")
        border = self.max_disp + self.kernel // 2
        sides = [-(-(s + 2 * self.pad - 2 * border) // self.stride1) for s in a[2:]]
        if min(sides) < 1:
            raise self.error(f"bottoms {a[2]}x{a[3]} (pad {self.pad}) are too small for "
                             f"max_displacement {self.max_disp} and kernel_size {self.kernel}")
        self.out_hw = tuple(sides)
        return [(a[0], (2 * self.radius + 1) ** 2, *sides)]

    def displacements(self) -> list[tuple[int, int]]:
        """(dy, dx) of bottom 1's patch for each top channel, in channel order."""
        r, s = self.radius, self.stride2
        return [(p * s, o * s) for p in range(-r, r + 1) for o in range(-r, r + 1)]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = legacy_shape(tuple(a.shape))
        pad = [self.pad] * 4
        return self.correlate(F.pad(a.reshape(shape), pad), F.pad(b.reshape(shape), pad),
                              (self.max_disp, self.max_disp))

    def correlate(self, a, b, corner: tuple[int, int]) -> torch.Tensor:
        """The top from padded bottoms; ``corner``: bottom 0's first patch's top-left."""
        (h, w), k = self.out_hw, self.kernel
        span_h, span_w = (h - 1) * self.stride1 + k, (w - 1) * self.stride1 + k
        y0, x0 = corner
        base = a[:, :, y0:y0 + span_h, x0:x0 + span_w]
        maps = []
        for dy, dx in self.displacements():
            other = b[:, :, y0 + dy:y0 + dy + span_h, x0 + dx:x0 + dx + span_w]
            per_pixel = (base - other).abs() if self.subtract else base * other
            maps.append(per_pixel.mean(dim=1, keepdim=True))
        # Mean over channels, then over the k×k window sampled every stride_1: the fork's
        # sum over k²·C values divided by k²·C.
        return F.avg_pool2d(torch.cat(maps, dim=1), k, self.stride1)


@register
class Correlation1D(Correlation):
    """DispNet's horizontal correlation (``correlation_param``): as ``Correlation`` with
    displacements along x only. Only the width is padded; top height
    ``ceil((H − 2·(k // 2)) / stride_1)``, width as Correlation's; patches of bottom 0 start
    at ``(y·stride_1, x·stride_1 + max_displacement)``. Channel c compares bottom 1 displaced
    by ``(c + shift)·stride_2`` with R = ``max_displacement / stride_2``: shift −R over 2R + 1
    channels (``single_direction: 0``), 0 over R + 1 (``1``, rightwards), −(R + 1) over R + 1
    (``-1``, leftwards, the fork's offsets −(R+1)…−1). Leftwards, the first patches reach one
    step past the padded row; the fork reads the previous row's last columns there, zero
    padding when ``pad`` covers the step (this layer reads zeros; for the batch's very
    first row the fork reads before its buffer); a smaller ``pad`` is refused. Gradients as Correlation's.
    """

    type = "Correlation1D"

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        a = _four_axes(self, bottom_shapes[0], "bottom 0")
        if a != _four_axes(self, bottom_shapes[1], "bottom 1"):
            raise self.error(f"both bottoms must have the same shape, got {list(a)} and "
                             f"{list(bottom_shapes[1])}")
        r = self.kernel // 2
        h = -(-(a[2] - 2 * r) // self.stride1)
        w = -(-(a[3] + 2 * self.pad - 2 * (self.max_disp + r)) // self.stride1)
        if min(h, w) < 1:
            raise self.error(f"bottoms {a[2]}x{a[3]} (pad {self.pad}) are too small for "
                             f"max_displacement {self.max_disp} and kernel_size {self.kernel}")
        self.overshoot = max(0, -(self.max_disp + self._shift() * self.stride2))
        if self.overshoot > self.pad:
            raise self.error(f"single_direction -1 reads {self.overshoot} column(s) left of "
                             f"the padded row; the fork then reads the previous row's pixels: "
                             f"pad must be at least {self.overshoot}")
        self.out_hw = (h, w)
        return [(a[0], len(self.displacements()), h, w)]

    def _shift(self) -> int:
        return {0: -self.radius, 1: 0, -1: -self.radius - 1}[self.direction]

    def displacements(self) -> list[tuple[int, int]]:
        width = self.radius + 1 if self.direction else 2 * self.radius + 1
        return [(0, (c + self._shift()) * self.stride2) for c in range(width)]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = legacy_shape(tuple(a.shape))
        # extra zeros on the left stand for the previous row's zero padding (class doc)
        pad = [self.pad + self.overshoot, self.pad, 0, 0]
        return self.correlate(F.pad(a.reshape(shape), pad), F.pad(b.reshape(shape), pad),
                              (0, self.max_disp + self.overshoot))


@register
class FlowWarp(Layer):
    """Bilinear warp of bottom 0 ``[N, C, H, W]`` by the flow bottom 1 ``[N, 2, H, W]``
    (``flow_warp_param``): top (y, x) samples the image at ``(x + u, y + v)``; where that
    point is not inside ``[0, W) × [0, H)`` (or is NaN) the top is ``fill_value`` (ZERO: 0,
    NOT_A_NUMBER: NaN). Corner (⌊x⌋, ⌊y⌋) and its right/lower neighbours, clamped to the
    last column/row, weighted ``(1−α)(1−β), α(1−β), (1−α)β, αβ``. Gradient: the fork's
    (the image gets the weights back, the flow the bilinear slopes; none outside).
    """

    type = "FlowWarp"
    origin = FLOWNET2
    num_bottoms = (2, 2)
    exports_to_onnx = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        nan = param.flow_warp_param.fill_value == caffe_pb2.FlowWarpParameter.NOT_A_NUMBER
        self.fill = float("nan") if nan else 0.0
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        image = _four_axes(self, bottom_shapes[0], "the image (bottom 0)")
        flow = _four_axes(self, bottom_shapes[1], "the flow (bottom 1)")
        if flow[1] != 2 or flow[0] != image[0] or flow[2:] != image[2:]:
            raise self.error(f"the flow must be [{image[0]}, 2, {image[2]}, {image[3]}] for "
                             f"image {list(image)}, got {list(flow)}")
        return [tuple(bottom_shapes[0])]

    def forward(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        shape = legacy_shape(tuple(image.shape))
        n, c, h, w = shape
        img = image.reshape(n, c, h * w)
        flow = flow.reshape(n, 2, h, w)
        ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                                torch.arange(w, device=flow.device, dtype=flow.dtype),
                                indexing="ij")
        x2, y2 = xs + flow[:, 0], ys + flow[:, 1]
        inside = (x2 >= 0) & (y2 >= 0) & (x2 < w) & (y2 < h)
        # Outside points read pixel (0, 0) and are replaced by the fill afterwards.
        x2 = torch.where(inside, x2, torch.zeros_like(x2))
        y2 = torch.where(inside, y2, torch.zeros_like(y2))
        left, top = x2.detach().floor().long(), y2.detach().floor().long()
        right, bottom = (left + 1).clamp(max=w - 1), (top + 1).clamp(max=h - 1)
        alpha, beta = (x2 - left).unsqueeze(1), (y2 - top).unsqueeze(1)

        def at(row, col):
            index = (row * w + col).reshape(n, 1, h * w).expand(n, c, h * w)
            return img.gather(2, index).reshape(n, c, h, w)

        out = ((1 - alpha) * (1 - beta) * at(top, left) + alpha * (1 - beta) * at(top, right)
               + (1 - alpha) * beta * at(bottom, left) + alpha * beta * at(bottom, right))
        fill = torch.full_like(out, self.fill)
        return torch.where(inside.unsqueeze(1), out, fill).reshape(image.shape)


class _ChannelNorm(torch.autograd.Function):
    """``sqrt(Σ_c x²)`` with the fork's backward ``dy · x / (norm + 1e-9)`` (finite at 0)."""

    @staticmethod
    def forward(ctx, x):
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt()
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    def backward(ctx, grad):
        x, norm = ctx.saved_tensors
        return grad * x / (norm + _CHANNEL_NORM_EPS)


@register
class ChannelNorm(Layer):
    """The L2 norm over channels: bottom ``[N, C, H, W]`` to top ``[N, 1, H, W]``, the
    fork's backward ``dy · x / (‖x‖ + 1e-9)`` (0 where the norm is 0). No parameters."""

    type = "ChannelNorm"
    origin = FLOWNET2
    exports_to_onnx = False

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        n, _, h, w = _four_axes(self, bottom_shapes[0], "the bottom")
        return [(n, 1, h, w)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ChannelNorm.apply(x.reshape(legacy_shape(tuple(x.shape))))


@register
class Accum(Layer):
    """Resize every bottom to one size and concatenate their channels (``accum_param``).

    Size: with ``have_reference`` the last bottom's height and width (it gives only its
    size); otherwise the largest height and width of the bottoms, replaced by
    (``size_divisible_by``: that size rounded up to a multiple; else ``top_height``,
    ``top_width``) when both of those are larger. Each bottom is resized with corner-aligned
    bilinear interpolation (``i·(in−1)/(out−1)``), as the fork. Gradient: the transposed
    interpolation (the fork's backward). A top side of 1 from a larger bottom is refused
    (the fork divides 0 by 0 there).
    """

    type = "Accum"
    origin = FLOWNET2
    num_bottoms = (1, None)
    exports_to_onnx = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.reference = param.accum_param.have_reference
        if self.reference and len(bottom_shapes) < 2:
            raise self.error("have_reference needs at least two bottoms (the last gives the "
                             "size)")
        self.top_shapes(bottom_shapes)

    def _size(self, shapes) -> tuple[int, int]:
        p = self.param.accum_param
        if self.reference:
            return shapes[-1][2], shapes[-1][3]
        h, w = max(s[2] for s in shapes), max(s[3] for s in shapes)
        if p.HasField("size_divisible_by") and p.size_divisible_by > 0:
            d = p.size_divisible_by
            want = (-(-h // d) * d, -(-w // d) * d)
        else:
            want = (p.top_height, p.top_width)
        return want if want[0] > h and want[1] > w else (h, w)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shapes = [_four_axes(self, s, f"bottom {i}") for i, s in enumerate(bottom_shapes)]
        inputs = shapes[:-1] if self.reference else shapes
        if any(s[0] != shapes[0][0] for s in shapes):
            raise self.error(f"all bottoms need the same num, got {[s[0] for s in shapes]}")
        self.size = self._size(shapes)
        for i, s in enumerate(inputs):
            if any(out == 1 and side > 1 for out, side in zip(self.size, s[2:])):
                raise self.error(f"bottom {i} ({s[2]}x{s[3]}) cannot be resized to "
                                 f"{self.size[0]}x{self.size[1]} (the fork divides by 0)")
        return [(shapes[0][0], sum(s[1] for s in inputs), *self.size)]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        inputs = bottoms[:-1] if self.reference else bottoms
        parts = []
        for x in inputs:
            x = x.reshape(legacy_shape(tuple(x.shape)))
            if tuple(x.shape[2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=True)
            parts.append(x)
        return torch.cat(parts, dim=1)
