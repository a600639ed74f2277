"""The ops a fused inference plan runs in place of layers (engine/net/fuse.py builds it).

``FoldedLinear``: a linear layer (Convolution, InnerProduct) whose weights carry the
per-channel affine map of the layers after it (BatchNorm, Scale, Bias: their ``affine``),
with an optional fused (leaky) ReLU; mid-sized 3x3 convolutions run as Winograd
(engine/net/winograd.py); in a measured plan a small 2-D convolution runs in the form timed
fastest (engine/net/conv_forms.py) and an InnerProduct on NHWC memory with NHWC-ordered
weights (engine/layers/fast_forms.py). ``InPlaceReLU``: a ReLU on a
tensor nothing else reads. ``InPlaceSum``: an Eltwise SUM accumulated into such a tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caffe_compat.engine.layers.base import Layer
from caffe_compat.engine.layers.fast_forms import NHWCColumns
from caffe_compat.engine.net import conv_forms, winograd


class FoldedLinear(nn.Module):
    """A linear layer (``linear_channels``: Convolution, InnerProduct, a plug-in's) with a
    folded per-output-channel affine map and an optional fused (leaky) ReLU. Weights are
    copies: the original layer is not touched; it computes with them (``linear_with``)."""

    def __init__(self, layer: Layer, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 slope: float | None):
        super().__init__()
        self.kind = layer.type
        self.layer_name = layer.name
        self.slope = slope
        self._linear = layer.linear_with        # a bound method: the layer is no submodule
        weight = layer.blobs[0].detach()
        bias = layer.blobs[1].detach() if len(layer.blobs) > 1 else None
        if scale is not None:
            weight, bias = _fold(weight, bias, scale, shift, out_axis=layer.weight_out_axis())
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.conv_args = layer.winograd_geometry()
        self.flat_linear = layer.flattened_linear()
        self._winograd_u: dict[int, torch.Tensor] = {}     # tile side -> G w G^T
        self.choose_form = False        # time the forms on the next input (conv_forms.py)
        self._form = None               # (form, its input shape, applies the rectifier, name)
        self.output_layout = None       # a channels-last plan's layout (its FusedNet sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choose_form:
            self._choose(x)
        form = self._form
        if form is not None and x.shape == form[1] and x.dtype == torch.float32:
            y = form[0](x)
            if form[2]:
                return y
        else:
            y = self._convolve(x)
        if self.slope is None:
            return y
        return F.relu_(y) if self.slope == 0.0 else F.leaky_relu_(y, self.slope)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The linear map with folded weights, without the rectifier."""
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), (None if b is None else b.to(x.dtype))
        tile = self._winograd_tile(x) if self.conv_args is not None else 0
        if tile:
            return winograd.conv3x3(x, self._winograd_weight(tile), b, self.conv_args["padding"])
        return self._linear(x, w, b)

    def _choose(self, x: torch.Tensor) -> None:
        self.choose_form = False
        if self.flat_linear and self.weight.dim() == 2 and NHWCColumns.applies(x):
            columns, b = NHWCColumns(self.weight.detach()), self.bias
            self._form = (lambda t: F.linear(columns.rows(t), columns.weight(t.shape), b),
                          x.shape, False, "nhwc columns")
            return
        if self.conv_args is None or self.weight.dim() != 4 or x.dim() != 4:
            return
        chosen = conv_forms.choose(self._convolve, self.weight.detach(), self.bias, self.conv_args,
                                   self.slope, x, self.output_layout)
        self._form = None if chosen is None else (chosen[0], x.shape, chosen[1], chosen[2])

    def _winograd_tile(self, x: torch.Tensor) -> int:
        a = self.conv_args
        return winograd.tile_for(self.weight, a["stride"], a["dilation"], a["groups"], x)

    def _winograd_weight(self, tile: int) -> torch.Tensor:
        """The transformed weights for ``tile``, made on first use (4x the weights' memory)."""
        if tile not in self._winograd_u:
            self._winograd_u[tile] = winograd.weight_transform(self.weight, tile)
        return self._winograd_u[tile]

    def extra_repr(self) -> str:
        return f"{self.kind} {self.layer_name!r}, relu={self.slope is not None}"


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
          shift: torch.Tensor, out_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale * (W x + b) + shift`` as one ``W' x + b'`` (scale/shift per output channel)."""
    view = [1] * weight.dim()
    view[out_axis] = -1
    w = (weight.double() * scale.reshape(view)).to(weight.dtype)
    b = shift if bias is None else bias.double() * scale + shift
    return w, b.to(weight.dtype)


class InPlaceReLU(nn.Module):
    """A (leaky) ReLU layer run in place on a tensor no other op reads."""

    def __init__(self, layer: Layer):
        super().__init__()
        self.layer_name = layer.name
        self.slope = layer.rectifier_slope()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and not torch.compiler.is_compiling() and x._is_view():
            # Autograd would rewrite the view's history through its base (CopySlices): a
            # zero-filled base gradient and strided copies, slower than a new tensor.
            # (A compiled graph is functionalised instead; the check would break it.)
            return F.relu(x) if self.slope == 0.0 else F.leaky_relu(x, self.slope)
        return F.relu_(x) if self.slope == 0.0 else F.leaky_relu_(x, self.slope)

    def extra_repr(self) -> str:
        return f"ReLU {self.layer_name!r}, slope={self.slope}"


class InPlaceSum(nn.Module):
    """An Eltwise SUM (every coeff 1) accumulated into its bottom ``into``, a fresh tensor
    nothing else reads: no new tensor, one memory pass fewer. Bottom 0 first, then the
    others in order, so the rounding is the layer's (for two bottoms a + b is b + a)."""

    def __init__(self, layer: Layer, into: int):
        super().__init__()
        self.layer_name = layer.name
        self.into = into

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        acc = bottoms[self.into]
        for i, b in enumerate(bottoms):
            if i != self.into:
                acc.add_(b)
        return acc

    def extra_repr(self) -> str:
        return f"Eltwise SUM {self.layer_name!r} into bottom {self.into}"

