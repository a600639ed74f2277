"""The ops a fused inference plan runs in place of layers (engine/net/fuse.py builds it).

``FoldedLinear``: a Convolution or InnerProduct whose weights carry the per-channel affine
map of the BatchNorm/Scale/Bias layers after it, with an optional fused (leaky) ReLU; mid-sized
3x3 convolutions run as Winograd (engine/net/winograd.py). ``InPlaceReLU``: a ReLU on a
tensor nothing else reads. ``InPlaceSum``: an Eltwise SUM accumulated into such a tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caffe_compat.engine.layers.base import Layer
from caffe_compat.engine.net import winograd


class FoldedLinear(nn.Module):
    """A Convolution or InnerProduct with a folded per-output-channel affine map and an
    optional fused (leaky) ReLU. Weights are copies: the original layer is not touched."""

    def __init__(self, layer: Layer, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 slope: float | None):
        super().__init__()
        self.kind = layer.type
        self.layer_name = layer.name
        self.slope = slope
        weight, bias = layer.blobs[0].detach(), (layer.blobs[1].detach() if layer.bias_term
                                                 else None)
        if scale is not None:
            weight, bias = _fold(weight, bias, scale, shift,
                                 out_axis=1 if getattr(layer, "transpose", False) else 0)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        if self.kind == "Convolution":
            self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.num_spatial]
            self.conv_args = dict(stride=layer.stride, padding=layer.pad,
                                  dilation=layer.dilation, groups=layer.group)
            self._winograd_u: dict[int, torch.Tensor] = {}     # tile side -> G w G^T
        else:
            self.transpose, self.K, self.num_output = layer.transpose, layer.K, layer.num_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), (None if b is None else b.to(x.dtype))
        if self.kind == "Convolution":
            tile = self._winograd_tile(x)
            if tile:
                y = winograd.conv3x3(x, self._winograd_weight(tile), b, self.conv_args["padding"])
            else:
                y = self.conv(x, w, b, **self.conv_args)
        else:
            y = F.linear(x.reshape(x.shape[0], self.K), w.t() if self.transpose else w, b)
        if self.slope is None:
            return y
        return F.relu_(y) if self.slope == 0.0 else F.leaky_relu_(y, self.slope)

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


def affine_of(layer: Layer, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, s) with ``layer(x) = a * x + s`` per channel of axis 1, or None if not foldable."""
    blobs = [b.detach().double() for b in layer.blobs]
    if layer.type == "BatchNorm":
        if not layer.use_global_stats or layer.channels != channels:
            return None
        mean_sum, var_sum, factor = blobs
        inv = 0.0 if float(factor[0]) == 0 else 1.0 / float(factor[0])
        a = 1.0 / torch.sqrt(var_sum * inv + layer.eps)
        return a, -mean_sum * inv * a
    from_bottom = layer.scale_from_bottom if layer.type == "Scale" else layer.bias_from_bottom
    if from_bottom or layer.axis != 1 or tuple(blobs[0].shape) != (channels,):
        return None
    if layer.type == "Bias":
        return torch.ones(channels, dtype=torch.float64), blobs[0]
    shift = blobs[-1] if layer.bias_term else torch.zeros(channels, dtype=torch.float64)
    return blobs[0], shift


class InPlaceReLU(nn.Module):
    """A (leaky) ReLU layer run in place on a tensor no other op reads."""

    def __init__(self, layer: Layer):
        super().__init__()
        self.layer_name = layer.name
        self.slope = layer.negative_slope

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

