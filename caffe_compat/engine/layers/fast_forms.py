"""Per-call work a fused inference plan can do once, at fusion: layer calls specialised for
the net's fixed blob shapes. A layer offers one through ``Layer.specialized`` (the layers
below set it to a form from this module); the inference pipeline's last pass asks every
step's layer.

On a batch-1 MTCNN O-Net a forward is ~1 ms of kernels and was ~0.3 ms more of Python per
call: each PReLU reshaped and cast its slopes, each Pooling recomputed Caffe's and torch's
output sizes and asked for indices it then dropped, each unfolded InnerProduct cast its
weights. Here those layers become closures over values computed once; a call whose input
shape is not the planned one (pycaffe's ``reshape``) goes to the layer itself.

The closures hold the layer's own parameter tensors (views, not copies): an in-place write
is seen, and a replaced tensor makes ``InferenceCache`` re-fuse, as for every other op.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import Layer, Shape

FLT_MAX = 3.4028234663852886e38


def _one_bottom(make: Callable) -> Callable:
    """``make(layer, shape)`` as ``Layer.specialized(bottom_shapes)``: one bottom only."""
    def specialized(layer: Layer, bottom_shapes: list[Shape]) -> Callable | None:
        return make(layer, tuple(bottom_shapes[0])) if len(bottom_shapes) == 1 else None
    specialized.__doc__ = make.__doc__
    return specialized


def _prelu(layer: Layer, shape: Shape) -> Callable:
    slope = layer.blobs[0]
    flat = slope.detach().reshape(-1)          # a view: in-place writes are seen

    def prelu(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != flat.dtype:
            return layer.forward(x)
        return torch.prelu(x, flat)
    return prelu


def _pooling(layer: Layer, shape: Shape) -> Callable | None:
    from caffe_compat.engine.layers.pooling import MAX, _torch_out
    if layer.pool != MAX or len(layer.param.top) > 1 or len(shape) != 4:
        return None
    k = layer._kernel_for(shape)
    out = layer._out_hw(shape)
    if not all(layer.pad[i] * 2 <= k[i] and _torch_out(shape[2 + i], k[i], layer.pad[i],
                                                        layer.stride[i], layer.ceil) == out[i]
               for i in range(2)):
        return None
    stride, pad, ceil, planned = layer.stride, layer.pad, layer.ceil, torch.Size(shape)

    def max_pool(x: torch.Tensor) -> torch.Tensor:
        if x.shape != planned or x.dtype != torch.float32:
            return layer.forward(x)
        # -FLT_MAX where no element beats it (all -inf windows), as the layer does
        # (clamp_min_: TorchScript's optimize_for_inference fails on clamp_(min=...))
        return F.max_pool2d(x, k, stride, pad, ceil_mode=ceil).clamp_min_(-FLT_MAX)
    return max_pool


def _inner_product(layer: Layer, shape: Shape) -> Callable | None:
    if layer.axis != 1 or len(shape) < 2:
        return None
    weight = layer.blobs[0].detach()
    w = weight.t() if layer.transpose else weight
    b = layer.blobs[1].detach() if layer.bias_term else None
    k = layer.K
    nhwc = NHWCColumns(weight) if layer.flattened_linear() and len(shape) == 4 else None

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != w.dtype:
            return layer.forward(x)
        if nhwc is not None and nhwc.applies(x):
            return F.linear(nhwc.rows(x), nhwc.weight(x.shape), b)
        return F.linear(x.reshape(x.shape[0], k), w, b)
    return linear


class NHWCColumns:
    """An InnerProduct's ``[N, C*H*W]`` weights with their columns in H, W, C order, for a
    channels-last 4-D bottom: Caffe flattens C, H, W, which on NHWC memory costs a copy
    (MTCNN O-Net's conv5: 2 of its 3 aten calls); in H, W, C order the rows are a view.
    Remade when the weights change in place (their version counter)."""

    def __init__(self, weight: torch.Tensor):
        self.source = weight
        self._made: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def applies(x: torch.Tensor) -> bool:
        return x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last)

    @staticmethod
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    def weight(self, shape: torch.Size) -> torch.Tensor:
        version = self.source._version
        if self._made is None or self._made[0] != version:
            n, (c, h, w) = self.source.shape[0], shape[1:]
            self._made = (version, self.source.reshape(n, c, h, w).permute(0, 2, 3, 1)
                          .reshape(n, c * h * w).contiguous())
        return self._made[1]


def _softmax(layer: Layer, shape: Shape) -> Callable:
    axis = layer.param.softmax_param.axis
    dim = axis + len(shape) if axis < 0 else axis
    if _narrow_last_axis(shape, dim):
        return _softmax_moved(layer, shape, dim)

    def softmax(x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=dim) if x.dim() == len(shape) else layer.forward(x)
    return softmax


def _narrow_last_axis(shape: Shape, dim: int) -> bool:
    """Softmax over a last axis narrower than one AVX-512 vector, on many rows: torch's kernel
    then runs row by row (UltraFace's scores, [1, 4420, 2]: 233 us; moved to the front, 31 us;
    [1, 4420, 8]: 652 against 72 us; the same or slower from 16 wide or below ~128 rows)."""
    rows = math.prod(shape[:dim]) if shape else 0
    return dim == len(shape) - 1 and shape[dim] < 16 and rows >= 128


def _softmax_moved(layer: Layer, shape: Shape, dim: int) -> Callable:
    planned = torch.Size(shape)

    def softmax(x: torch.Tensor) -> torch.Tensor:
        if x.shape != planned:
            return layer.forward(x)
        moved = x.movedim(dim, 0).contiguous()
        return torch.softmax(moved, 0).movedim(0, dim).contiguous()
    return softmax


def _flatten_like(layer: Layer, shape: Shape) -> Callable | None:
    """Reshape / Flatten: the top's shape, computed once for the planned bottom shape."""
    try:
        top = tuple(layer.top_shapes([shape])[0])
    except Exception:   # noqa: BLE001 - a layer that cannot say: keep it as it is
        return None
    if not top or math.prod(top) != math.prod(shape):
        return None
    planned, top = torch.Size(shape), tuple(top)

    def reshape(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(top) if x.shape == planned else layer.forward(x)
    return reshape


prelu = _one_bottom(_prelu)
max_pool = _one_bottom(_pooling)
linear = _one_bottom(_inner_product)
softmax = _one_bottom(_softmax)
reshape = _one_bottom(_flatten_like)
