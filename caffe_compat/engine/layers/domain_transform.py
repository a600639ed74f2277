"""DeepLab v2's DomainTransform (deeplab-public-ver2 ``domain_transform_layer.cpp``, used by
DT-EdgeNet, Chen et al. CVPR 2016): edge-preserving recursive filtering of features against a
learned edge map, with the fork's forward and backward.

Each of ``num_iter`` iterations filters four times in place, left->right, right->left,
top->bottom, bottom->top: ``y[i] += w * (y[i-1] - y[i])`` with ``i-1`` the neighbour already
visited and ``w`` the weight at the larger of the two positions. Iteration ``k`` (0-based) uses
``sigma_k = spatial_sigma * sqrt(3) * 2^(num_iter - k - 1) / sqrt(4^num_iter - 1)`` and the
weights ``clamp(exp(-sqrt(2) / sigma_k * (1 + ref * spatial_sigma / range_sigma)),
min_weight, 1)``. Only the top-left ``input_height x input_width`` of each image (bottom 2) is
filtered; the rest is copied.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register


def _steps(length: int, backwards: bool) -> list[tuple[int, int]]:
    """(position, neighbour visited before it) for one recursive pass along an axis."""
    if backwards:
        return [(j, j + 1) for j in range(length - 2, -1, -1)]
    return [(j, j - 1) for j in range(1, length)]


def _pass_views(region: torch.Tensor, weight: torch.Tensor, pass_index: int):
    """The (C, rows, length) view and (rows, length) weights a pass runs along (its last axis)
    and whether it runs backwards. Passes 2 and 3 are the vertical ones: transposed views."""
    if pass_index >= 2:
        region, weight = region.transpose(1, 2), weight.t()
    return region, weight, pass_index % 2 == 1


def _filter_forward(region: torch.Tensor, weight: torch.Tensor, pass_index: int) -> torch.Tensor:
    """One pass in place on ``region`` (C, h, w); returns the differences the backward needs."""
    line, wt, backwards = _pass_views(region, weight, pass_index)
    diffs = torch.zeros_like(line)
    for cur, prev in _steps(line.shape[-1], backwards):
        diffs[..., cur] = line[..., prev] - line[..., cur]
        line[..., cur] += wt[:, max(cur, prev)] * diffs[..., cur]
    return diffs


def _filter_backward(grad: torch.Tensor, weight: torch.Tensor, diffs: torch.Tensor,
                     weight_grad: torch.Tensor, pass_index: int) -> None:
    """Undo one pass on the gradient ``grad`` (C, h, w) in place, adding the gradient of its
    weights (summed over channels) to ``weight_grad`` (h, w)."""
    line, wt, backwards = _pass_views(grad, weight, pass_index)
    wgrad = weight_grad.t() if pass_index >= 2 else weight_grad
    for cur, prev in reversed(_steps(line.shape[-1], backwards)):
        edge = max(cur, prev)
        wgrad[:, edge] += (line[..., cur] * diffs[..., cur]).sum(0)
        line[..., prev] += wt[:, edge] * line[..., cur]
        line[..., cur] *= 1 - wt[:, edge]


class _DomainTransformFunction(torch.autograd.Function):
    """The fork's recursion and its hand-written backward. As there, the edge map's gradient is
    ``-sqrt(2)/sigma_k * spatial_sigma/range_sigma * w * dL/dw`` even where ``w`` is clamped to
    ``min_weight`` or 1 (the fork multiplies by the clamped weight, never by a zero slope)."""

    @staticmethod
    def forward(ctx, features, ref, sizes, sigmas, ratio, min_weight):
        out = features.detach().clone()
        ctx.saved = []
        for n, (height, width) in enumerate(sizes):
            region = out[n, :, :height, :width]
            weights = [_weights(ref[n, 0, :height, :width], sigma, ratio, min_weight)
                       for sigma in sigmas]
            diffs = [[_filter_forward(region, w, p) for p in range(4)] for w in weights]
            ctx.saved.append((weights, diffs))
        ctx.sizes, ctx.sigmas, ctx.ratio = sizes, sigmas, ratio
        ctx.ref_shape = ref.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_features = grad.clone()
        grad_ref = grad.new_zeros(ctx.ref_shape)
        for n, (height, width) in enumerate(ctx.sizes):
            region = grad_features[n, :, :height, :width]
            weights, diffs = ctx.saved[n]
            for k in reversed(range(len(ctx.sigmas))):
                weight_grad = grad.new_zeros(height, width)
                for p in reversed(range(4)):
                    _filter_backward(region, weights[k], diffs[k][p], weight_grad, p)
                slope = -math.sqrt(2.0) / ctx.sigmas[k] * ctx.ratio
                grad_ref[n, 0, :height, :width] += slope * weight_grad * weights[k]
        return grad_features, grad_ref, None, None, None, None


def _weights(ref: torch.Tensor, sigma: float, ratio: float, min_weight: float) -> torch.Tensor:
    raw = torch.exp(-math.sqrt(2.0) / sigma * (1 + ref.detach() * ratio))
    return raw.clamp(min=min_weight).clamp(max=1.0)


@register
class DomainTransform(Layer):
    """Bottoms: features ``[N, C, H, W]``, reference edge map ``[N, 1, H, W]``, and per image
    at least two values ``(input_height, input_width)`` (truncated to int, each at most H or W:
    the image's size before padding). Top: the filtered features. Gradients reach the features
    and the edge map, as the fork's backward computes them; none reaches bottom 2 (the fork's
    LOG(FATAL))."""

    type = "DomainTransform"
    family = "common"
    origin = "DeepLab v2"
    num_bottoms = (3, 3)
    no_grad_bottoms = (2,)
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.domain_transform_param
        if not (p.spatial_sigma > 0 and p.range_sigma > 0):
            raise self.error(f"domain_transform_param.spatial_sigma ({p.spatial_sigma:g}) and "
                             f"range_sigma ({p.range_sigma:g}) must be positive")
        if not p.min_weight >= 0:
            raise self.error(f"domain_transform_param.min_weight ({p.min_weight:g}) must not "
                             "be negative")
        if p.num_iter <= 0:
            raise self.error(f"domain_transform_param.num_iter ({p.num_iter}) must be positive")
        total = math.sqrt(4.0 ** p.num_iter - 1)
        self.sigmas = [p.spatial_sigma * math.sqrt(3.0) * 2.0 ** (p.num_iter - k - 1) / total
                       for k in range(p.num_iter)]
        self.ratio = p.spatial_sigma / p.range_sigma
        self.min_weight = float(p.min_weight)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        try:
            n, _, h, w = legacy_shape(tuple(bottom_shapes[0]))
            ref = legacy_shape(tuple(bottom_shapes[1]))
        except ValueError:
            raise self.error("the features and the edge map must have at most 4 axes "
                             "(N, C, H, W)") from None
        if ref != (n, 1, h, w):
            raise self.error(f"the edge map {list(bottom_shapes[1])} must be [{n}, 1, {h}, {w}] "
                             f"for features {list(bottom_shapes[0])}")
        dims = tuple(bottom_shapes[2])
        if not dims or dims[0] != n or math.prod(dims[1:]) < 2:
            raise self.error(f"the size blob {list(dims)} must hold (input_height, input_width) "
                             f"for each of the {n} images")
        return [tuple(bottom_shapes[0])]

    def _sizes(self, features: torch.Tensor, dims: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's (input_height, input_width), checked against the blob's H and W."""
        _, _, h, w = legacy_shape(tuple(features.shape))
        sizes = []
        for n, row in enumerate(dims.detach().reshape(dims.shape[0], -1)[:, :2].cpu().tolist()):
            height, width = int(row[0]), int(row[1])               # static_cast<int>
            if not (0 <= height <= h and 0 <= width <= w):
                raise self.error(f"image {n}: input size {height}x{width} is outside the "
                                 f"{h}x{w} blob")
            sizes.append((height, width))
        return sizes

    def forward(self, features: torch.Tensor, ref: torch.Tensor, dims: torch.Tensor):
        self.top_shapes([tuple(features.shape), tuple(ref.shape), tuple(dims.shape)])
        shape = legacy_shape(tuple(features.shape))
        out = _DomainTransformFunction.apply(
            features.reshape(shape), ref.reshape(shape[0], 1, *shape[2:]),
            self._sizes(features, dims), self.sigmas, self.ratio, self.min_weight)
        return out.reshape(features.shape)
