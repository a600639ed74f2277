"""InnerProduct (``inner_product_layer.cpp``): a fully connected layer.

The axes from ``axis`` on are flattened into K; the output is ``shape[:axis] + [num_output]``.
Weights are ``[N, K]`` (``nn.Linear``'s layout), or ``[K, N]`` with ``transpose: true``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.fillers import FillerError, fill
from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis
from caffe_compat.engine.layers import fast_forms


@register
class InnerProduct(Layer):
    """Caffe InnerProduct: ``y = x W^T + b`` over the flattened trailing axes."""

    type = "InnerProduct"
    specialized = fast_forms.linear      # a batch-1 forward without per-call work

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        ip = param.inner_product_param
        shape = tuple(bottom_shapes[0])
        self.num_output = ip.num_output
        if self.num_output <= 0:
            raise self.error("num_output must be set to a positive number of outputs")
        self.axis = canonical_axis(self, ip.axis, len(shape))
        self.K = math.prod(shape[self.axis:])
        self.transpose = ip.transpose
        self.bias_term = ip.bias_term
        wshape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.add_blob(self._fill(ip.weight_filler if ip.HasField("weight_filler") else None,
                                 wshape, "weight_filler"))
        if self.bias_term:
            self.add_blob(self._fill(ip.bias_filler if ip.HasField("bias_filler") else None,
                                     (self.num_output,), "bias_filler"))

    def _fill(self, filler, shape: Shape, what: str) -> torch.Tensor:
        try:
            return fill(filler, shape)
        except FillerError as e:
            raise self.error(f"{what}: {e}") from None

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        if len(shape) <= self.axis or math.prod(shape[self.axis:]) != self.K:
            raise self.error(f"input size incompatible with inner product parameters: bottom "
                             f"{list(shape)} flattened from axis {self.axis} must have "
                             f"{self.K} elements")
        return [(*shape[:self.axis], self.num_output)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.blobs[0].to(x.dtype)
        if self.transpose:
            w = w.t()  # stored [K, N]; F.linear wants [N, K]
        b = self.blobs[1].to(x.dtype) if self.bias_term else None
        # (M, K) with M = prod(shape[:axis]) -> (M, N) -> shape[:axis] + (N,)
        y = F.linear(x.reshape(math.prod(x.shape[:self.axis]), self.K), w, b)
        if self.axis == 1:
            return y                         # already (N, num_output): no view on top
        return y.reshape(*x.shape[:self.axis], self.num_output)

    def output_not_saved(self, num_bottoms: int) -> bool:
        return True

    def linear_channels(self, top_shape: Shape) -> int | None:
        return self.num_output if self.axis == 1 and len(top_shape) == 2 else None

    def linear_with(self, x, weight, bias):
        w = weight.to(x.dtype)
        return F.linear(x.reshape(x.shape[0], self.K), w.t() if self.transpose else w,
                        None if bias is None else bias.to(x.dtype))

    def flattened_linear(self) -> bool:
        return self.axis == 1 and not self.transpose

    def weight_out_axis(self) -> int:
        return 1 if self.transpose else 0

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, K={self.K}, num_output={self.num_output}, axis={self.axis}, "
                f"transpose={self.transpose}, bias={self.bias_term}")
