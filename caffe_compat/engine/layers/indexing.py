"""Layers that pick rows by index or hold a blob: BatchReindex, Embed, Filter, Parameter.

Index and selector bottoms are float-coded integers (Caffe casts with ``static_cast<int>``);
Caffe cannot backpropagate to them, so they never receive a gradient. Gradients to the
data rows add up where an index repeats, as Caffe's backward accumulates.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.fillers import FillerError, fill
from caffe_compat.engine.layers.base import Layer, Shape, register


def _indices(layer: Layer, values: torch.Tensor, limit: int, what: str,
             whole: bool = False) -> torch.Tensor:
    """Truncate float indices to int64 and check them against [0, limit) on CPU (a device
    check would sync every step). ``whole``: a fractional index is an error (Embed)."""
    idx = values.detach().reshape(-1).long()
    if idx.device.type == "cpu" and idx.numel():
        if whole and bool((idx.to(values.dtype) != values.detach().reshape(-1)).any()):
            raise layer.error(f"{what} values must be whole numbers")
        bad = (idx < 0) | (idx >= limit)
        if bool(bad.any()):
            raise layer.error(f"{what} {int(idx[bad][0])} is out of range [0, {limit})")
    return idx


@register
class BatchReindex(Layer):
    """``top[i] = bottom0[idx[i]]``; top shape ``(len(idx),) + bottom0.shape[1:]``."""

    type = "BatchReindex"
    num_bottoms = (2, 2)
    no_grad_bottoms = (1,)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        data, idx = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(idx) != 1:
            raise self.error(f"the index bottom must be 1-D, got shape {list(idx)}")
        return [(idx[0], *data[1:])]

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(x.shape), tuple(idx.shape)])
        return x.index_select(0, _indices(self, idx, x.shape[0], "index"))


@register
class Embed(Layer):
    """Caffe Embed: a lookup table. Weight ``(input_dim, num_output)``, bias ``(num_output,)``;
    top shape is the index bottom's shape plus ``num_output``."""

    type = "Embed"
    no_grad_bottoms = (0,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        ep = param.embed_param
        self.num_output, self.input_dim, self.bias_term = ep.num_output, ep.input_dim, ep.bias_term
        if self.num_output <= 0 or self.input_dim <= 0:
            raise self.error("embed_param needs positive num_output and input_dim")
        self.add_blob(self._fill(ep, "weight_filler", (self.input_dim, self.num_output)))
        if self.bias_term:
            self.add_blob(self._fill(ep, "bias_filler", (self.num_output,)))

    def _fill(self, ep, field: str, shape: Shape) -> torch.Tensor:
        try:
            return fill(getattr(ep, field) if ep.HasField(field) else None, shape)
        except FillerError as e:
            raise self.error(f"{field}: {e}") from None

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return [(*bottom_shapes[0], self.num_output)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        weight = self.blobs[0]
        rows = F.embedding(_indices(self, idx, self.input_dim, "index", whole=True), weight)
        if self.bias_term:
            rows = rows + self.blobs[1]
        return rows.reshape(*idx.shape, self.num_output)


@register
class Filter(Layer):
    """Caffe Filter: keep the rows whose selector (the last bottom) is non-zero, from every
    other bottom into the matching top. Before the first forward the tops are shaped like
    the bottoms (Caffe's first Reshape keeps every row)."""

    type = "Filter"
    num_bottoms = (2, None)
    num_tops = (1, None)
    # its tops' first axis is the count of non-zero selectors, known only at run time: an
    # export binds fixed output shapes (the prefix stops here; the engine runs what precedes)
    # and a trace or a CUDA graph would replay the example's row count
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.no_grad_bottoms = (len(bottom_shapes) - 1,)
        if param.top and len(param.top) != len(bottom_shapes) - 1:
            raise self.error(f"needs one top per filtered bottom ({len(bottom_shapes) - 1}), "
                             f"got {len(param.top)}")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        selector = tuple(bottom_shapes[-1])
        if not selector or any(d != 1 for d in selector[1:]):
            raise self.error(f"selector dimensions must be singletons except the first, got "
                             f"{list(selector)}")
        for s in bottom_shapes[:-1]:
            if not s or s[0] != selector[0]:
                raise self.error(f"every bottom needs the selector's first dimension "
                                 f"{selector[0]}, got {list(s)}")
        return [tuple(s) for s in bottom_shapes[:-1]]

    def forward(self, *bottoms: torch.Tensor):
        self.top_shapes([tuple(b.shape) for b in bottoms])
        keep = torch.nonzero(bottoms[-1].detach().reshape(-1) != 0).reshape(-1)
        tops = tuple(b.index_select(0, keep) for b in bottoms[:-1])
        return tops[0] if len(tops) == 1 else tops


@register
class Parameter(Layer):
    """Caffe Parameter: its one blob (``parameter_param.shape``, zeros until loaded or set)
    is its top, so a net can learn a free tensor."""

    type = "Parameter"
    num_bottoms = (0, 0)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.shape = tuple(int(d) for d in param.parameter_param.shape.dim)
        self.add_blob(fill(None, self.shape))     # zeros, after the budget check

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return [self.shape]

    def forward(self) -> torch.Tensor:
        return self.blobs[0] * 1      # a fresh tensor: pycaffe writes into blob views
