"""The lean plan: a NetModule's own plan with fewer ops and fewer saved tensors, for the runs
that keep no intermediate blob (the solver's training step, a test pass, ``forward()``).

- A BatchNorm whose top only a Scale reads (ResNet's ``BatchNorm`` + ``Scale bias_term``)
  runs as one ``F.batch_norm`` with the Scale's gamma and beta as its affine weights. The
  arithmetic is Caffe's: ``gamma * (x - mu) / sqrt(var + eps) + beta`` with the same batch
  (or global) statistics, and the statistics blobs are updated exactly as BatchNorm's
  forward does. Apart it costs a second activation tensor saved for the Scale's backward
  and two more passes over memory (and, under bf16/fp16 autocast, a float32 Scale output:
  its gamma is float32).
- A Split hands its bottom on as each top (no views, no op).
- A ReLU that alone reads the new tensor of a Convolution, InnerProduct, BatchNorm, Scale,
  Bias or Eltwise SUM rectifies it in place. None of those saves its output for backward
  (each keeps its input, weights or nothing), so autograd's version check never trips; the
  ReLU's own backward needs only its output, which is the same tensor.

Nothing here changes what the blobs hold that a caller sees: a lean run returns only the
outputs (and losses), which no fusion touches. Runs that expose every blob (pycaffe,
``keep_all``, a partial run, ``record``) use the layer-by-layer plan.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from caffe_compat.engine.layers.base import Layer
from caffe_compat.engine.net.folded import InPlaceReLU
from caffe_compat.proto import caffe_pb2

if TYPE_CHECKING:
    from caffe_compat.engine.net.module import NetModule, _Step

# Layers whose single top is a new tensor that their backward does not need.
_OUTPUT_NOT_SAVED = {"Convolution", "Deconvolution", "ConvolutionDepthwise", "InnerProduct",
                     "BatchNorm", "Scale", "Bias"}


class BatchNormScale:
    """``Scale(BatchNorm(x))`` as one batch normalisation with an affine part.

    A plain object, not an nn.Module: the parameters stay registered once, under their own
    layers, and are read from them at every call (sharing and snapshots replace them)."""

    full_precision = False

    def __init__(self, batch_norm: Layer, scale: Layer):
        self.batch_norm, self.scale = batch_norm, scale
        self.type = "BatchNorm+Scale"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bn, scale = self.batch_norm, self.scale
        if x.dim() < 2 or x.shape[1] != bn.channels:
            return scale(bn(x))           # the layers themselves report or handle these
        beta = scale.blobs[-1] if scale.bias_term else None
        return bn.normalize(x, scale.blobs[0], beta)


class Alias:
    """A Split as no op: every top is the bottom tensor itself. The layer hands out distinct
    views so that pycaffe can read each top's diff; without them autograd sums the fan-out's
    gradients in place in its own buffer instead of through a new tensor per sum."""

    full_precision = False
    type = "Split (alias)"

    def __init__(self, tops: int):
        self.tops = tops

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,) * self.tops


def lean_plan(module: "NetModule") -> list["_Step"]:
    """``module``'s plan with the fusions of the module docstring applied."""
    plan = module._plan
    readers = plan_readers(module)
    steps: list[_Step] = []
    absorbed: set[int] = set()
    for pos, step in enumerate(plan):
        if pos in absorbed:
            continue
        layer = module.layers[step.index]
        nxt = _sole_reader(plan, readers, pos)
        if layer.type == "BatchNorm" and nxt is not None and \
                _scales_channels(module.layers[plan[nxt].index], layer.channels) and \
                not any(plan[nxt].detach) and \
                name_free(plan, pos, nxt, plan[nxt].tops[0], []):
            absorbed.add(nxt)
            steps.append(replace(step, tops=plan[nxt].tops,
                                 call=BatchNormScale(layer, module.layers[plan[nxt].index])))
            continue
        if layer.type == "Split":
            steps.append(replace(step, call=Alias(len(step.tops))))
            continue
        steps.append(replace(step))      # a copy: the lean plan sets its own releases
    _rectify_in_place(module, steps)
    return steps


def plan_readers(module: "NetModule") -> dict[tuple[int, str], list[int]]:
    """For each blob version (producing plan position, name): the positions reading it.
    Output and loss blobs get a pseudo-consumer (-1) so they are never folded away."""
    current: dict[str, int] = {}
    readers: dict[tuple[int, str], list[int]] = {}
    for pos, step in enumerate(module._plan):
        for b in step.bottoms:
            readers.setdefault((current[b], b), []).append(pos)
        for t in step.tops:
            current[t] = pos
            readers.setdefault((pos, t), [])
    for name in set(module.output_names) | set(module.loss_weights):
        readers[(current[name], name)].append(-1)
    return readers


def name_free(plan, start: int, end: int, name: str, chain: list[int]) -> bool:
    """No step strictly between ``start`` and ``end``, outside the chain, reads or writes
    ``name`` (the fused op writes it early, at ``start``)."""
    return all(name not in plan[p].bottoms and name not in plan[p].tops
               for p in range(start + 1, end) if p not in chain)


def _sole_reader(plan, readers, pos: int) -> int | None:
    """The one step reading ``pos``'s single top, if exactly one does (outputs count)."""
    step = plan[pos]
    if len(step.tops) != 1 or len(step.bottoms) != 1:
        return None
    who = readers[(pos, step.tops[0])]
    return who[0] if len(who) == 1 and who[0] >= 0 else None


def _scales_channels(layer: Layer, channels: int) -> bool:
    """A Scale layer multiplying axis 1 by a learned per-channel gamma of ``channels``."""
    if layer.type != "Scale" or layer.scale_from_bottom or len(layer.param.bottom) != 1:
        return False
    return tuple(layer.blobs[0].shape) == (channels,) and getattr(layer, "axis", None) == 1


def _fresh_unsaved(module: "NetModule", step: "_Step") -> bool:
    """``step`` makes a new tensor for its single top that its backward does not keep."""
    if len(step.tops) != 1:
        return False
    if isinstance(step.call, BatchNormScale):
        return True
    if step.call is not None:
        return False
    layer = module.layers[step.index]
    if layer.type == "Eltwise":
        p = layer.param.eltwise_param
        return p.operation == caffe_pb2.EltwiseParameter.SUM and len(step.bottoms) >= 2
    return layer.type in _OUTPUT_NOT_SAVED and len(step.bottoms) == 1


def _rectify_in_place(module: "NetModule", steps: list["_Step"]) -> None:
    """Turn each ReLU that reads a fresh, unsaved tensor into an in-place one.

    Being its only reader needs no count: Caffe's Split insertion turns every fan-out (a
    second reader, or a loss_weight on the blob) into a Split, and a Split's alias is not
    a fresh tensor; a net output has no reader at all."""
    writer: dict[str, int] = {}
    for pos, step in enumerate(steps):
        layer = module.layers[step.index]
        if layer.type == "ReLU" and step.call is None and len(step.bottoms) == 1 \
                and layer.negative_slope >= 0 and not step.detach[0]:
            source = writer.get(step.bottoms[0])
            if source is not None and _fresh_unsaved(module, steps[source]):
                steps[pos] = replace(step, call=InPlaceReLU(layer))
        for t in step.tops:
            writer[t] = pos
