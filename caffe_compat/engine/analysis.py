"""Static analysis of a Caffe net: receptive fields, parameters, FLOPs and kernel capacity.

Everything is computed from a built ``NetModule`` (its layers, blob shapes and blobs), so any
prototxt that builds can be analysed; ``load_net`` swaps data layers for Input layers of the
same shapes, so no database is needed.

Conventions (``tools/net_analysis.py`` prints them with every report):

* **Receptive field** of a blob: per spatial axis, the number of input-image pixels (padding
  included, as if the image were unbounded) that one position of the blob depends on. It is
  exact for the graph: the interval of needed positions is carried backwards from the blob to
  the image through every layer (Convolution/Pooling ``[a·s − p, b·s − p + d(k−1)]``,
  Deconvolution ``[⌈(a + p − d(k−1))/s⌉, ⌊(b + p)/s⌋]``, Crop offsets, WITHIN_CHANNEL LRN,
  element-wise layers unchanged), taking the hull over all the paths that reach the image
  (Eltwise, Concat, Split, in-place layers), and the maximum over the blob's positions
  (after a deconvolution it varies with the position). The **jump** is the distance in
  image pixels between neighbouring positions.
* **Conv stage** ``k``: the Convolution layers named ``conv<k>`` or ``conv<k>_<j>`` (VGG's
  blocks, AlexNet's single convs); its receptive field is that of its last conv's top.
  Shortcut projections, the landmark branch and the fully connected layers are counted in the
  totals only.
* **FLOPs per image** = 2 × multiply-accumulates of Convolution (``out_pixels · C_in/g ·
  kh·kw`` per output channel), Deconvolution (``in_pixels · C_out/g · kh·kw`` per input
  channel) and InnerProduct (``N·K``) layers; biases, pooling, LRN, activations, element-wise
  layers and losses are not counted (together under 1% for these nets).
* **Kernel capacity** (the paper does not define it; this is our metric): the normalised
  effective rank of a conv layer's filter matrix ``W`` reshaped to ``(out, in/group·kh·kw)``.
  With singular values σ and ``p = σ/Σσ``, ``erank = exp(−Σ p log p)`` (Roy & Vetterli 2007),
  and ``capacity = erank / min(out, in/group·kh·kw)`` in (0, 1]: the fraction of the filter
  bank's possible independent directions that it actually uses. A stage's capacity is the mean
  over its convs; tables divide by conv stage 1's value so that conv1 = 1, as the paper does.
  Computed from trained weights it measures what training made of the filters; from the
  fillers it is a property of the random initialisation only.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from caffe_compat.engine import weights as weights_io
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.engine.layers.base import TEST
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.proto import caffe_pb2

STAGE_PATTERN = re.compile(r"^conv(\d+)(?:_\d+)?$")
DATA_LAYER_TYPES = ("Data", "ImageData")
_MIXING = {"InnerProduct", "Flatten", "Reshape"}   # each output sees every spatial position


# ---------------------------------------------------------------------------- loading


def data_as_input(net: caffe_pb2.NetParameter, channels: int = 3) -> caffe_pb2.NetParameter:
    """A copy of ``net`` whose Data/ImageData layers are Input layers of the same top shapes.

    Tops are ``data`` (batch, channels, crop, crop), ``label`` (batch,) and, with
    ``num_landmarks`` K, ``landmarks`` (batch, K, 3). The crop size must be set (it is in every
    model here); the image channel count cannot be read from the prototxt, so it is given.
    Include/exclude rules are kept, so TRAIN and TEST nets still differ as written.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for lp in out.layer:
        if lp.type not in DATA_LAYER_TYPES:
            continue
        dp = lp.data_param if lp.type == "Data" else lp.image_data_param
        crop = lp.transform_param.crop_size or dp.crop_size
        if crop:
            hw = (crop, crop)
        elif lp.type == "ImageData" and dp.new_height and dp.new_width:
            hw = (dp.new_height, dp.new_width)
        else:
            raise ValueError(f"layer '{lp.name}' ({lp.type}): no crop_size, so the image size "
                             "is only known from the data; run on the real data instead")
        batch = dp.batch_size or 1
        shapes = [(batch, channels, *hw), (batch,), (batch, dp.num_landmarks, 3)]
        name, tops, rules = lp.name, list(lp.top), (list(lp.include), list(lp.exclude))
        lp.Clear()
        lp.name, lp.type = name, "Input"
        lp.top.extend(tops)
        lp.include.extend(rules[0])
        lp.exclude.extend(rules[1])
        for shape in shapes[:len(tops)]:
            lp.input_param.shape.add().dim.extend(shape)
    return out


def load_net(path: str, phase: int = TEST, weights: str | None = None, channels: int = 3,
             stages: Sequence[str] = ()) -> NetModule:
    """Build a prototxt for analysis: data layers become Input layers; optional caffemodel."""
    param = data_as_input(read_text_proto(path, caffe_pb2.NetParameter), channels)
    net = build_net(param, phase, stages=stages, source=str(path))
    if weights:
        weights_io.copy_from(net, weights)
    return net


# ---------------------------------------------------------------------------- receptive field


@dataclass(frozen=True)
class Field:
    """Receptive field of one blob: size and jump per spatial axis (h, w), in image pixels."""
    size: tuple[int, int]
    jump: tuple[float, float]


def image_blob(net: NetModule) -> str:
    """The first 4-D top of a source layer (Input/Data/...): the image the fields refer to."""
    for name, layer in net.named_layers():
        if layer.is_source:
            for top in net.top_names[name]:
                if len(net.blob_shapes[top]) == 4:
                    return top
    raise ValueError(f"{net.source}: no 4-D input blob (Input or data layer) to measure from")


def _producer(net: NetModule, blob: str) -> int:
    """Index of the last layer that writes ``blob`` (in-place layers rewrite it)."""
    index = -1
    for i, name in enumerate(net.layer_names):
        if blob in net.top_names[name]:
            index = i
    if index < 0:
        raise KeyError(f"{net.source}: no blob named '{blob}'")
    return index


def _back(layer, axis: int, lo: np.ndarray, hi: np.ndarray, top_len: int, bottom_len: int):
    """Positions of one bottom needed for top positions [lo, hi] along spatial ``axis``."""
    t = layer.type
    if t in ("Convolution", "Pooling"):
        if t == "Pooling" and layer.global_pooling:
            return np.zeros_like(lo), np.full_like(hi, bottom_len - 1)
        k, s, p = layer.kernel[axis], layer.stride[axis], layer.pad[axis]
        d = layer.dilation[axis] if t == "Convolution" else 1
        return lo * s - p, hi * s - p + d * (k - 1)
    if t == "Deconvolution":
        k, s, p, d = layer.kernel[axis], layer.stride[axis], layer.pad[axis], layer.dilation[axis]
        return np.ceil((lo + p - d * (k - 1)) / s), np.floor((hi + p) / s)
    if t == "Crop":
        offsets = list(layer.param.crop_param.offset) or [0]
        start = layer.param.crop_param.axis
        start = start + 4 if start < 0 else start
        i = 2 + axis - start
        off = 0 if i < 0 else (offsets[0] if len(offsets) == 1 else offsets[i])
        return lo + off, hi + off
    if t == "LRN" and layer.region == 1:           # WITHIN_CHANNEL: an n×n spatial window
        r = layer.size // 2
        return lo - r, hi + r
    if t in _MIXING or top_len != bottom_len:
        return np.zeros_like(lo), np.full_like(hi, bottom_len - 1)
    return lo, hi                                  # element-wise, channel-wise, Split, Eltwise


def receptive_field(net: NetModule, blob: str, image: str | None = None) -> Field:
    """Exact receptive field of ``blob`` (see the module docstring)."""
    image = image or image_blob(net)
    shape = net.blob_shapes[blob]
    if len(shape) != 4:
        raise ValueError(f"blob '{blob}' has shape {shape}; receptive fields need N×C×H×W")
    last = _producer(net, blob)
    sizes = []
    for axis in (0, 1):
        n = shape[2 + axis]
        pos = np.arange(n, dtype=np.float64)
        need = {blob: (pos.copy(), pos.copy())}
        for i in range(last, -1, -1):
            name = net.layer_names[i]
            layer = net.layers[i]
            tops = [t for t in net.top_names[name] if t in need]
            if not tops:
                continue
            lo = np.min([need[t][0] for t in tops], axis=0)
            hi = np.max([need[t][1] for t in tops], axis=0)
            top_len = net.blob_shapes[tops[0]][2 + axis]
            for b in net.bottom_names[name]:
                bshape = net.blob_shapes[b]
                if len(bshape) != 4:
                    continue
                blo, bhi = _back(layer, axis, lo, hi, top_len, bshape[2 + axis])
                if b in need and b not in tops:
                    blo = np.minimum(blo, need[b][0])
                    bhi = np.maximum(bhi, need[b][1])
                need[b] = (blo, bhi)
            for t in tops:
                if t != image and t not in net.bottom_names[name]:
                    del need[t]                    # produced here; earlier layers cannot
        if image not in need:
            raise ValueError(f"blob '{blob}' does not depend on the image blob '{image}'")
        lo, hi = need[image]
        sizes.append(int(np.max(hi - lo)) + 1)
    return Field(tuple(sizes), jump(net, blob, image))


def jump(net: NetModule, blob: str, image: str | None = None) -> tuple[float, float]:
    """Image pixels between neighbouring positions of ``blob`` (product of strides)."""
    image = image or image_blob(net)
    jumps: dict[str, tuple[float, float]] = {image: (1.0, 1.0)}
    for name, layer in net.named_layers():
        spatial = [b for b in net.bottom_names[name] if b in jumps]
        if not spatial:
            continue
        j = jumps[spatial[0]]
        if layer.type in ("Convolution", "Pooling") and not getattr(layer, "global_pooling", 0):
            j = tuple(j[a] * layer.stride[a] for a in (0, 1))
        elif layer.type == "Deconvolution":
            j = tuple(j[a] / layer.stride[a] for a in (0, 1))
        elif layer.type in _MIXING or (layer.type == "Pooling" and layer.global_pooling):
            continue
        for t in net.top_names[name]:
            if len(net.blob_shapes[t]) == 4:
                jumps[t] = j
    if blob not in jumps:
        raise ValueError(f"blob '{blob}' has no spatial relation to the image '{image}'")
    return jumps[blob]


# ---------------------------------------------------------------------------- counts


def _unique_blobs(net: NetModule) -> list[tuple[str, torch.nn.Parameter]]:
    seen, out = set(), []
    for name, layer in net.named_layers():
        for p in layer.blobs:
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


def param_count(net: NetModule, trainable: bool = False) -> int:
    """Number of parameters in all layer blobs (shared blobs once); ``trainable``: lr_mult ≠ 0."""
    if trainable:
        return sum(lp.tensor.numel() for lp in net.learnable_params if lp.lr_mult != 0)
    return sum(p.numel() for _, p in _unique_blobs(net))


def layer_params(net: NetModule, name: str) -> int:
    return sum(p.numel() for p in net.layers[net.layer_index(name)].blobs)


def layer_macs(net: NetModule, name: str) -> int:
    """Multiply-accumulates per image of one layer (0 for types that are not counted)."""
    layer = net.layers[net.layer_index(name)]
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        return 0
    bottom = net.blob_shapes[net.bottom_names[name][0]]
    top = net.blob_shapes[net.top_names[name][0]]
    weight = layer.blobs[0]
    if layer.type == "Convolution":
        # weight [C_out, C_in/g, kh, kw]: each top element takes C_in/g·kh·kw products
        return math.prod(top[1:]) * weight[0].numel()
    if layer.type == "Deconvolution":
        # weight [C_in, C_out/g, kh, kw]: each bottom element scatters C_out/g·kh·kw products
        return math.prod(bottom[1:]) * weight[0].numel()
    # InnerProduct: N·K per output row; rows = dims between axis 1 and the product axis
    return weight.numel() * math.prod(top[1:-1])


def total_macs(net: NetModule) -> int:
    return sum(layer_macs(net, n) for n in net.layer_names)


# ---------------------------------------------------------------------------- capacity


def kernel_capacity(weight: torch.Tensor) -> float:
    """Normalised effective rank of ``weight`` reshaped to (out, everything else), in (0, 1]."""
    m = weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1)
    s = torch.linalg.svdvals(m)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    erank = math.exp(float(-(p * p.log()).sum()))
    return erank / min(m.shape)


# ---------------------------------------------------------------------------- stages


def conv_stages(net: NetModule, pattern: re.Pattern = STAGE_PATTERN) -> dict[int, list[str]]:
    """``{k: [conv layer names]}`` for Convolution layers named conv<k> or conv<k>_<j>."""
    stages: dict[int, list[str]] = {}
    for name, layer in net.named_layers():
        m = pattern.match(name)
        if m and layer.type == "Convolution":
            stages.setdefault(int(m.group(1)), []).append(name)
    return dict(sorted(stages.items()))


@dataclass
class Stage:
    index: int
    layers: list[str]
    field: Field
    capacity: float
    params: int
    macs: int


@dataclass
class Report:
    name: str
    source: str
    input_shape: tuple[int, ...]
    stages: list[Stage]
    params: int
    trainable_params: int
    macs: int
    layers: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def relative_capacity(self) -> list[float]:
        """Stage capacities divided by the first stage's (conv1 = 1)."""
        first = self.stages[0].capacity if self.stages else 0.0
        return [s.capacity / first if first else float("nan") for s in self.stages]


def analyse(net: NetModule, pattern: re.Pattern = STAGE_PATTERN) -> Report:
    """Per-stage receptive field, capacity, params and MACs, plus net totals."""
    image = image_blob(net)
    stages = []
    for k, names in conv_stages(net, pattern).items():
        top = net.top_names[names[-1]][0]
        caps = [kernel_capacity(net.layers[net.layer_index(n)].blobs[0]) for n in names]
        stages.append(Stage(k, names, receptive_field(net, top, image), float(np.mean(caps)),
                            sum(layer_params(net, n) for n in names),
                            sum(layer_macs(net, n) for n in names)))
    layers = [(n, l.type, net.blob_shapes[net.top_names[n][0]] if net.top_names[n] else (),
               layer_params(net, n), layer_macs(net, n)) for n, l in net.named_layers()]
    shape = net.blob_shapes[image]
    return Report(net.name, net.source, (1, *shape[1:]), stages, param_count(net),
                  param_count(net, trainable=True), total_macs(net), layers)


def conv_fields(net: NetModule, names: Iterable[str] | None = None) -> dict[str, Field]:
    """Receptive field of the top of every Convolution/Pooling/Deconvolution/Eltwise layer."""
    image = image_blob(net)
    out = {}
    for name, layer in net.named_layers():
        if names is not None and name not in names:
            continue
        if layer.type in ("Convolution", "Pooling", "Deconvolution", "Eltwise"):
            out[name] = receptive_field(net, net.top_names[name][0], image)
    return out
