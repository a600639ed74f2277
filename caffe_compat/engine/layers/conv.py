"""Convolution and Deconvolution (``base_conv_layer.cpp``, ``conv_layer.cpp``, ``deconv_layer.cpp``).

Both read ``convolution_param``. Caffe's convolution is cross-correlation, so the fused torch
ops (``F.conv{1,2,3}d`` and ``F.conv_transpose{1,2,3}d``) compute exactly Caffe's result; the
code here only reproduces Caffe's parameter rules, blob layouts and output sizes.

Caffe lets one layer take several bottoms (all the same shape) and convolve each with the
same weights into the matching top; that is supported too.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.fillers import FillerError, fill
from caffe_compat.formats.coords import inverse, window_map
from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis

log = logging.getLogger(__name__)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _BaseConvolution(Layer):
    """Parameter parsing, blobs and shapes shared by Convolution and Deconvolution."""

    num_bottoms = (1, None)
    num_tops = (1, None)
    _reverse = False  # Deconvolution swaps the roles of input and output channels.

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        cp = param.convolution_param
        if len(param.top) and len(param.top) != len(bottom_shapes):
            raise self.error(f"needs as many tops as bottoms (got {len(bottom_shapes)} bottoms, "
                             f"{len(param.top)} tops)")
        shape0 = tuple(bottom_shapes[0])
        self.axis = canonical_axis(self, cp.axis, len(shape0))
        self.num_spatial = len(shape0) - self.axis - 1
        if self.num_spatial not in _CONV:
            raise self.error(f"{self.num_spatial} spatial axes after channel axis {self.axis} "
                             f"(bottom shape {list(shape0)}); only 1-D, 2-D and 3-D convolution "
                             "are supported")
        self._kernel_params(cp)

        self.channels = shape0[self.axis]
        self.num_output = cp.num_output
        self.group = cp.group
        if self.num_output <= 0:
            raise self.error("num_output must be set to a positive number of output channels")
        if self.group <= 0:
            raise self.error(f"group must be positive (got {self.group})")
        if self.channels % self.group:
            raise self.error(f"input channels ({self.channels}) must be a multiple of "
                             f"group ({self.group})")
        if self.num_output % self.group:
            raise self.error(f"num_output ({self.num_output}) must be a multiple of "
                             f"group ({self.group})")
        self.top_shapes(bottom_shapes)  # validates bottom shapes and output sizes

        # Weights: [out, in/group, *k] where (out, in) are (num_output, channels) for
        # Convolution and (channels, num_output) for Deconvolution, as Caffe stores them.
        conv_out, conv_in = ((self.channels, self.num_output) if self._reverse
                             else (self.num_output, self.channels))
        wshape = (conv_out, conv_in // self.group, *self.kernel)
        self.bias_term = cp.bias_term
        self.add_blob(self._fill(cp.weight_filler if cp.HasField("weight_filler") else None,
                                 wshape, "weight_filler"))
        if self.bias_term:
            self.add_blob(self._fill(cp.bias_filler if cp.HasField("bias_filler") else None,
                                     (self.num_output,), "bias_filler"))

    # -- parameter parsing --------------------------------------------------------------
    def _kernel_params(self, cp) -> None:
        """kernel, stride, pad and dilation per spatial axis from ``convolution_param``."""
        self.kernel = self._spatial("kernel", list(cp.kernel_size), cp.HasField("kernel_h"),
                                    cp.HasField("kernel_w"), cp.kernel_h, cp.kernel_w, None)
        self.stride = self._spatial("stride", list(cp.stride), cp.HasField("stride_h"),
                                    cp.HasField("stride_w"), cp.stride_h, cp.stride_w, 1)
        self.pad = self._spatial("pad", list(cp.pad), cp.HasField("pad_h"), cp.HasField("pad_w"),
                                 cp.pad_h, cp.pad_w, 0)
        self.dilation = self._spatial("dilation", list(cp.dilation), False, False, 0, 0, 1)
        for name, values in (("kernel_size", self.kernel), ("stride", self.stride),
                             ("dilation", self.dilation)):
            if min(values) < 1:
                raise self.error(f"{name} must be positive in every spatial dimension, got {values}")

    def _spatial(self, name: str, values: list[int], has_h: bool, has_w: bool, h: int, w: int,
                 default: int | None) -> list[int]:
        """One value per spatial axis from `name` (once or per axis) or `name_h`/`name_w`."""
        field = "kernel_size" if name == "kernel" else name
        n = self.num_spatial
        if has_h or has_w:
            if n != 2:
                raise self.error(f"{name}_h/{name}_w can only be used for 2-D convolution "
                                 f"(this one has {n} spatial axes); use {field} instead")
            if values:
                raise self.error(f"give either {field} or {name}_h/{name}_w, not both")
            if not (has_h and has_w) and default != 0:
                # A missing one is 0 in the proto, an invalid kernel/stride (a lone pad_h is fine).
                raise self.error(f"{name}_h and {name}_w must be given together")
            return [h, w]
        if not values:
            if default is None:
                raise self.error(f"{field} (or {name}_h and {name}_w) is required")
            return [default] * n
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise self.error(f"{field} must be given once or once per spatial dimension "
                             f"(given {len(values)} times for {n} spatial dimensions)")
        return values

    def _fill(self, filler, shape: Shape, what: str) -> torch.Tensor:
        try:
            return fill(filler, shape)
        except FillerError as e:
            raise self.error(f"{what}: {e}") from None

    # -- the contract ---------------------------------------------------------------------
    def _out_size(self, size: int, i: int) -> int:
        raise NotImplementedError

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape0 = tuple(bottom_shapes[0])
        for s in bottom_shapes[1:]:
            if tuple(s) != shape0:
                raise self.error(f"all bottoms must have the same shape ({list(shape0)} vs {list(s)})")
        if len(shape0) != self.axis + 1 + self.num_spatial:
            raise self.error(f"bottom has {len(shape0)} axes, but the layer was built for "
                             f"{self.axis + 1 + self.num_spatial}")
        if shape0[self.axis] != self.channels:
            raise self.error(f"bottom has {shape0[self.axis]} channels, but the layer was built "
                             f"for {self.channels}")
        spatial = shape0[self.axis + 1:]
        out = [self._out_size(spatial[i], i) for i in range(self.num_spatial)]
        if min(out) <= 0:
            raise self.error(f"output size {out} is empty for input size {list(spatial)} "
                             f"(kernel {self.kernel}, stride {self.stride}, pad {self.pad}, "
                             f"dilation {self.dilation})")
        top = (*shape0[:self.axis], self.num_output, *out)
        return [top] * len(bottom_shapes)

    def forward(self, *bottoms: torch.Tensor):
        weight = self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        tops = []
        for x in bottoms:
            if self.axis == 1:               # the usual case: no views (see InPlaceReLU)
                tops.append(self._conv(x, weight, bias))
                continue
            lead = x.shape[:self.axis]
            # Axes before the channel axis are all batch axes: (prod(lead), C, *spatial).
            xb = x.reshape(math.prod(lead), *x.shape[self.axis:])
            y = self._conv(xb, weight, bias)
            tops.append(y.reshape(*lead, *y.shape[1:]))
        return tops[0] if len(tops) == 1 else tuple(tops)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        raise NotImplementedError

    def output_not_saved(self, num_bottoms: int) -> bool:
        return num_bottoms == 1

    def _window_map(self):
        extent = [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel)]
        return window_map(self.axis, self.stride, extent, self.pad)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, {self.channels}->{self.num_output}, kernel={self.kernel}, "
                f"stride={self.stride}, pad={self.pad}, dilation={self.dilation}, "
                f"group={self.group}, bias={self.bias_term}")


@register
class Convolution(_BaseConvolution):
    """Caffe Convolution: weights ``[num_output, C/group, *k]``, bias ``[num_output]``."""

    type = "Convolution"

    def _out_size(self, size: int, i: int) -> int:
        extent = self.dilation[i] * (self.kernel[i] - 1) + 1
        span = size + 2 * self.pad[i] - extent
        # A negative span would be truncated towards zero by Caffe's int division and give
        # a bogus size; treat it as empty (reported by top_shapes).
        return span // self.stride[i] + 1 if span >= 0 else 0

    def _conv(self, x, weight, bias):
        return _CONV[self.num_spatial](x, weight.to(x.dtype),
                                       None if bias is None else bias.to(x.dtype),
                                       stride=self.stride, padding=self.pad,
                                       dilation=self.dilation, groups=self.group)

    def coord_map(self):
        return inverse(self._window_map())

    def linear_channels(self, top_shape: Shape) -> int | None:
        return self.num_output if len(self.param.bottom) == 1 and self.axis == 1 else None

    def linear_with(self, x, weight, bias):
        return self._conv(x, weight, bias)

    def winograd_geometry(self) -> dict | None:
        if self.num_spatial != 2:
            return None
        return dict(stride=self.stride, padding=self.pad, dilation=self.dilation,
                    groups=self.group)


@register
class Deconvolution(_BaseConvolution):
    """Caffe Deconvolution: weights ``[C, num_output/group, *k]`` (the ConvTranspose layout).

    Output size ``s(in-1) + d(k-1) + 1 - 2p``; Caffe has no output_padding.
    """

    type = "Deconvolution"
    _reverse = True

    def _out_size(self, size: int, i: int) -> int:
        return (self.stride[i] * (size - 1) + self.dilation[i] * (self.kernel[i] - 1) + 1
                - 2 * self.pad[i])

    def coord_map(self):
        return self._window_map()

    def _conv(self, x, weight, bias):
        return _DECONV[self.num_spatial](x, weight.to(x.dtype),
                                         None if bias is None else bias.to(x.dtype),
                                         stride=self.stride, padding=self.pad,
                                         dilation=self.dilation, groups=self.group)


@register
class Im2col(Convolution):
    """Caffe Im2col: the column buffer a Convolution multiplies, as a top (no weights).

    Top ``(..., C*kh*kw, out_h, out_w)``; column ``c*kh*kw + i*kw + j`` holds input channel
    ``c`` at kernel offset ``(i, j)``, which is ``F.unfold``'s order. 2-D only here.
    """

    type = "Im2col"
    num_bottoms = (1, 1)
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        Layer.__init__(self, param, bottom_shapes, phase)
        cp = param.convolution_param
        shape0 = tuple(bottom_shapes[0])
        self.axis = canonical_axis(self, cp.axis, len(shape0))
        self.num_spatial = len(shape0) - self.axis - 1
        if self.num_spatial != 2:
            raise self.error(f"only 2-D im2col is supported (bottom {list(shape0)} has "
                             f"{self.num_spatial} spatial axes after axis {self.axis})")
        self._kernel_params(cp)
        self.channels = shape0[self.axis]
        self.num_output = self.channels * math.prod(self.kernel)
        self.group, self.bias_term = 1, False
        self.top_shapes(bottom_shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:self.axis]
        xb = x.reshape(math.prod(lead), *x.shape[self.axis:])
        cols = F.unfold(xb, self.kernel, dilation=self.dilation, padding=self.pad,
                        stride=self.stride)                        # (N, C*kh*kw, L)
        out = [self._out_size(xb.shape[2 + i], i) for i in range(2)]
        return cols.reshape(*lead, self.num_output, *out)

    def output_not_saved(self, num_bottoms: int) -> bool:
        return False                         # a reshape of unfold's columns

    def linear_channels(self, top_shape: Shape) -> int | None:
        return None

    def winograd_geometry(self) -> dict | None:
        return None


@register
class ConvolutionDepthwise(Convolution):
    """The MobileNet/ShuffleNet forks' ConvolutionDepthwise: one filter per input channel.

    It reads ``convolution_param`` and equals a Convolution with ``group`` and ``num_output``
    both set to the bottom's channel count: weights ``[C, 1, kh, kw]``, bias ``[C]``, floor
    output sizes. As in those forks, ``num_output`` and ``group`` are not consulted (a
    different ``num_output`` is reported and ignored).
    """

    type = "ConvolutionDepthwise"
    family = "conv"
    origin = "the MobileNet and ShuffleNet forks"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        cp = param.convolution_param
        shape0 = tuple(bottom_shapes[0])
        channels = shape0[cp.axis] if len(shape0) > abs(cp.axis) else 0
        if cp.HasField("num_output") and cp.num_output != channels:
            log.warning("layer '%s' (ConvolutionDepthwise): num_output %d ignored; the output "
                        "has the input's %d channels", param.name, cp.num_output, channels)
        depthwise = type(param)()
        depthwise.CopyFrom(param)
        depthwise.convolution_param.num_output = channels
        depthwise.convolution_param.group = channels
        super().__init__(depthwise, bottom_shapes, phase)


@register
class DepthwiseConvolution(Convolution):
    """eric612/MobileNet-YOLO's DepthwiseConvolution. The fork's CPU forward and backward are
    Caffe's own grouped convolution, so ``convolution_param`` is read as Convolution reads it
    (``num_output`` and ``group`` as given; the fork's nets set both to the bottom's channel
    count, which makes it depthwise). Its CUDA kernel assumes that depthwise setting and
    agrees with the CPU forward there.
    """

    type = "DepthwiseConvolution"
    family = "conv"
    origin = "eric612/MobileNet-YOLO"
