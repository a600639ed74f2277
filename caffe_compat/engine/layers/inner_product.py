"""InnerProduct (``inner_product_layer.cpp``): a fully connected layer.

The axes from ``axis`` on are flattened into K; the output is ``shape[:axis] + [num_output]``.
Weights are ``[N, K]`` (``nn.Linear``'s layout), or ``[K, N]`` with ``transpose: true``.

happynear/caffe-windows (branch ms, AM-Softmax) adds ``normalize: true``: every forward, both
phases, first scales each weight row to unit length in place, ``w / sqrt(|w|² + 1e-12)`` (its
CUDA forward; its CPU forward adds 1e-6), so the stored blob changes, then computes the plain
product. Its backward is the plain one with those unit rows: no gradient through the scaling
(the solver's step leaves the rows off unit length until the next forward rescales them).
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

UNIT_ROW_EPS = 1e-12    # caffe-windows' CUDA forward: added to each row's squared length


@register
class InnerProduct(Layer):
    """Caffe InnerProduct: ``y = x W^T + b`` over the flattened trailing axes."""

    type = "InnerProduct"

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
        self.normalize = ip.normalize
        if self.normalize:
            self._refuse_normalize_transpose()
            # the stored weights change inside forward: no cached, folded or exported copy
            self.traceable = False
            self.exports_to_onnx = False
        wshape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        self.add_blob(self._fill(ip.weight_filler if ip.HasField("weight_filler") else None,
                                 wshape, "weight_filler"))
        if self.bias_term:
            self.add_blob(self._fill(ip.bias_filler if ip.HasField("bias_filler") else None,
                                     (self.num_output,), "bias_filler"))

    def _refuse_normalize_transpose(self) -> None:
        if self.transpose:
            raise self.error("inner_product_param: normalize with transpose; caffe-windows "
                             "scales K-long runs of the [K, N] blob, which are not its rows")

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

    def _unit_rows(self) -> torch.Tensor:
        """Rescale blob 0's rows in place (the fork's forward); return a copy for the product,
        so the next forward's rescaling leaves this one's saved weights (its backward) alone."""
        blob = self.blobs[0]
        with torch.no_grad():
            blob.div_(torch.sqrt(blob.square().sum(1, keepdim=True) + UNIT_ROW_EPS))
        return blob.clone()

    def specialized(self, bottom_shapes):
        return None if self.normalize else fast_forms.linear(self, bottom_shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._unit_rows() if self.normalize else self.blobs[0]
        w = w.to(x.dtype)
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
        if self.normalize:         # a folded copy of the weights would skip the rescaling
            return None
        return self.num_output if self.axis == 1 and len(top_shape) == 2 else None

    def linear_with(self, x, weight, bias):
        w = weight.to(x.dtype)
        return F.linear(x.reshape(x.shape[0], self.K), w.t() if self.transpose else w,
                        None if bias is None else bias.to(x.dtype))

    def flattened_linear(self) -> bool:
        return self.axis == 1 and not self.transpose and not self.normalize

    def weight_out_axis(self) -> int:
        return 1 if self.transpose else 0

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, K={self.K}, num_output={self.num_output}, axis={self.axis}, "
                f"transpose={self.transpose}, bias={self.bias_term}")
