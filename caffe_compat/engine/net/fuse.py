"""The inference pipeline: a TEST-phase NetModule's plan rewritten to compute its outputs with
fewer ops, and the ``FusedNet`` that executes it (engine/net/plan.py's executor).

``fused_for_inference(module)`` returns a new ``FusedNet`` and leaves ``module`` untouched.
Its passes (each ``plan -> plan``, asking the layers' capabilities, engine/layers/base.py):

- ``drop_feeds``: Input steps go; the FusedNet binds its inputs by position;
- ``alias_copies`` (shared with the training pipeline): Split and TEST-phase Dropout are
  aliases (no op at all);
- ``fold_affine_chains``: a linear layer (``linear_channels``: Convolution, InnerProduct)
  followed by any chain of layers with an ``affine`` form (BatchNorm with global statistics,
  Scale and Bias with learned per-channel operands) becomes one op whose weights and bias
  carry the map: for output channel c, ``y = a_c * (W_c * x + b_c) + s_c`` folds to
  ``W'_c = a_c W_c`` and ``b'_c = a_c b_c + s_c`` (computed in float64); a rectifier after
  it is fused too;
- ``convolutions_channels_last``: the other 2-D linear layers get their own weight copy;
- ``in_place_ops``: a rectifier that alone reads a ``fresh_output`` runs in place, and a
  plain sum (``sums_bottoms``) accumulates into a folded op's output nothing else reads.

A chain is only folded when each intermediate value has exactly one consumer (Caffe's
Split insertion guarantees fan-out shows up as a Split) and is not an output, so the fused
net's outputs are the original's. Intermediate blobs are not kept: use the NetModule itself
(``run``) when every blob is wanted.

Folded weights are a snapshot. ``InferenceCache`` (engine/net/inference_cache.py) re-fuses
when a parameter tensor of the original changes (torch's in-place version counter, bumped by
``copy_``/``weights.copy_from`` and the solver's updates); writes that bypass torch (a numpy
view's ``a[...] = v``) must call ``InferenceCache.invalidate()``.

``frozen_for_inference(fused, inputs)`` (engine/net/frozen.py) additionally traces, freezes and
runs ``torch.jit.optimize_for_inference`` on the steps a trace can keep; whether that wins is
per net and per machine, so the benchmark suite measures it.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from caffe_compat.engine.layers.base import TEST, Layer
from caffe_compat.engine.net import conv_forms
from caffe_compat.engine.net.denormals import FlushDenormals, keep_subnormals
from caffe_compat.engine.net.folded import FoldedLinear, InPlaceReLU, InPlaceSum
from caffe_compat.engine.net.module import NetModule
from caffe_compat.engine.net.plan import Step, execute, mark_releases
from caffe_compat.engine.net.train_fuse import (alias_copies, name_free, plain_layer,
                                                plan_readers)

log = logging.getLogger(__name__)


class FusedNet(nn.Module):
    """The fused plan of a NetModule: ``forward(*inputs)`` (in ``input_names`` order) returns
    the output tensors in ``output_names`` order; ``outputs(**inputs)`` returns a dict."""

    def __init__(self, module: NetModule, plan: list[Step]):
        super().__init__()
        self.name = module.name
        self.source = module.source
        self.input_names = list(module.input_names)
        self.output_names = list(module.output_names)
        self.plan = plan
        self.steps = nn.ModuleList(s.fn for s in plan if isinstance(s.fn, nn.Module))
        self.flush_denormals = not keep_subnormals()
        mark_releases(self.plan, set(self.output_names))

    @property
    def ops(self) -> list[Step]:
        """The plan (its earlier name)."""
        return self.plan

    channels_last = False

    def use_channels_last(self) -> None:
        """NHWC weights for this net's own 2-D convolutions, NHWC 4-D inputs."""
        self.channels_last = True
        for step in self.plan:
            if isinstance(step.fn, FoldedLinear) and step.fn.weight.dim() == 4:
                step.fn.weight.data = step.fn.weight.data.contiguous(
                    memory_format=torch.channels_last)
                step.fn.output_layout = torch.channels_last

    def laid_out(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The inputs in the memory layout the plan runs in."""
        if not self.channels_last:
            return inputs
        return tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                     for t in inputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = dict(zip(self.input_names, self.laid_out(inputs)))
        if self.flush_denormals and not torch.compiler.is_compiling():
            with FlushDenormals():      # subnormal activations: engine/net/denormals.py
                blobs = execute(self.plan, feeds, keep_all=False, source=self.source)
        else:
            blobs = execute(self.plan, feeds, keep_all=False, source=self.source)
        return tuple(blobs[name] for name in self.output_names)

    def ordered_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``inputs`` (name -> tensor) in ``forward``'s order; KeyError naming any missing."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.name}: input blob(s) {', '.join(missing)} were not fed")
        return tuple(inputs[n] for n in self.input_names)

    def outputs(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.output_names, self(*self.ordered_inputs(inputs))))


def drop_feeds(plan: list[Step], module: NetModule) -> list[Step]:
    return [step for step in plan if not step.feed]


def fold_affine_chains(plan: list[Step], module: NetModule, fold: bool = True,
                       fuse_relu: bool = True) -> list[Step]:
    """Each linear layer with the affine layers (and a final rectifier) that solely consume
    its top, as one ``FoldedLinear`` step."""
    readers = plan_readers(plan, module.kept_blobs())
    absorbed: set[int] = set()
    out: list[Step] = []
    for pos, step in enumerate(plan):
        if pos in absorbed:
            continue
        head = plain_layer(module, step)
        channels = head.linear_channels(module.blob_shapes[step.tops[0]]) \
            if head is not None and step.tops else None
        folded = _fold_chain(plan, module, pos, channels, readers, absorbed, fold, fuse_relu) \
            if channels is not None else None
        out.append(folded or step)
    return out


def convolutions_channels_last(plan: list[Step], module: NetModule) -> list[Step]:
    """A 2-D linear layer left unfolded gets its own weight copy (made NHWC by the FusedNet)."""
    out = []
    for step in plan:
        layer = plain_layer(module, step)
        if layer is not None and step.tops and \
                layer.linear_channels(module.blob_shapes[step.tops[0]]) is not None and \
                layer.winograd_geometry() is not None:
            step = replace(step, fn=FoldedLinear(layer, None, None, None))
        out.append(step)
    return out


def inference_pipeline(fold: bool = True, fuse_relu: bool = True,
                       channels_last: bool = False) -> list:
    """The inference passes, in order, for these options (each ``(plan, module) -> plan``)."""
    passes = [drop_feeds, alias_copies]
    if fold or fuse_relu:
        passes.append(partial(fold_affine_chains, fold=fold, fuse_relu=fuse_relu))
    if channels_last:
        passes.append(convolutions_channels_last)
    if fuse_relu:
        passes.append(in_place_ops)
    return passes


def fused_for_inference(module: NetModule, fold: bool = True, fuse_relu: bool = True,
                        channels_last: bool = False, measure: bool = False) -> FusedNet:
    """A FusedNet computing ``module``'s outputs (see the module docstring).

    ``channels_last``: every 2-D convolution gets its own NHWC copy of its weights and 4-D
    inputs are fed NHWC, so oneDNN runs every convolution in its blocked layout (PyTorch
    otherwise sends batch-1 1x1 convolutions to its slow im2col path). ``measure``: each
    small 2-D convolution runs in the form fastest here for its shapes (``measure_forms``;
    the forms are not all exportable, so exports leave it off)."""
    plan = list(module.plan())
    for rewrite in inference_pipeline(fold, fuse_relu, channels_last or measure):
        plan = rewrite(plan, module)
    plan = [replace(step, direct=True) for step in plan]   # own releases; no module hooks
    specialize_calls(plan, module)
    fused = FusedNet(module, plan)
    if channels_last:
        fused.use_channels_last()
    if measure:
        measure_forms(fused, module)
    return fused


def measure_forms(fused: FusedNet, module: NetModule) -> None:
    """A forward on zero inputs of the planned shapes, up to the last FoldedLinear that may
    pick a form for the tensor layout it is given: a small 2-D convolution by timing
    (engine/net/conv_forms.py), an InnerProduct on a 4-D bottom with NHWC-ordered weights."""
    chosen = [pos for pos, s in enumerate(fused.plan) if isinstance(s.fn, FoldedLinear) and (
        s.fn.flat_linear and len(module.blob_shapes[s.bottoms[0]]) == 4
        or s.fn.conv_args is not None and conv_forms.worth_measuring(
            s.fn.weight.shape, module.blob_shapes[s.bottoms[0]], s.fn.conv_args))]
    if not chosen:
        return
    for pos in chosen:
        fused.plan[pos].fn.choose_form = True
    feeds = dict(zip(fused.input_names, fused.laid_out(
        tuple(torch.zeros(module.blob_shapes[n]) for n in fused.input_names))))
    try:
        with torch.no_grad():
            execute(fused.plan, feeds, end=chosen[-1], keep_all=False, source=fused.source)
    except Exception as exc:   # noqa: BLE001 - a layer refusing zeros: the rest keep their own
        log.debug("%s: forms not measured past a failing layer: %s", fused.source, exc)
    for pos in chosen:
        fused.plan[pos].fn.choose_form = False


def specialize_calls(plan: list[Step], module: NetModule) -> None:
    """Each layer step calls the form its layer offers for the planned shapes, if any
    (``Layer.specialized``): the last pass, since it binds the step's final layer."""
    for pos, step in enumerate(plan):
        if isinstance(step.fn, Layer):
            fast = step.fn.specialized([module.blob_shapes[b] for b in step.bottoms])
            if fast is not None:
                plan[pos] = replace(step, specialized=fast)


def in_place_ops(plan: list[Step], module: NetModule) -> list[Step]:
    """Steps that may reuse a bottom's memory: a rectifier reading a fresh tensor, and a
    plain sum with a bottom that a FoldedLinear just made (ResNet's residual sums: the
    branch's last convolution), when nothing else reads that tensor.

    Reads are counted on the fused plan itself, per written version; an alias step (Split,
    Dropout) counts as a reader, so a tensor seen under two names is never written."""
    plan = list(plan)
    reads: dict[tuple[int, str], int] = {
        key: len(who) for key, who in plan_readers(plan, module.kept_blobs()).items()}
    writer: dict[str, int] = {}

    def sole(name: str) -> Step | None:
        """The step that wrote ``name``, if the step being looked at is its only reader."""
        source = writer.get(name)
        return None if source is None or reads.get((source, name)) != 1 else plan[source]

    for pos, step in enumerate(plan):
        layer = plain_layer(module, step)
        if layer is not None and len(step.bottoms) == 1 and \
                layer.rectifier_slope() is not None and _fresh(module, sole(step.bottoms[0])):
            plan[pos] = replace(step, fn=InPlaceReLU(layer))
        elif layer is not None and layer.sums_bottoms():
            into = _sum_target(step, sole)
            if into is not None:
                plan[pos] = replace(step, fn=InPlaceSum(layer, into))
        for t in step.tops:
            writer[t] = pos
    return plan


def _fresh(module: NetModule, step: Step | None) -> bool:
    """``step`` returns a new tensor that no other op holds."""
    if step is None:
        return False
    if isinstance(step.fn, (InPlaceSum, FoldedLinear)):
        return True                      # a sum into, or a copy of weights for, a fresh tensor
    layer = plain_layer(module, step)
    return layer is not None and layer.fresh_output(len(step.bottoms))


def _sum_target(step: Step, sole) -> int | None:
    """The bottom a plain sum may accumulate into (``sole(name)``: the writer of that
    bottom when this step is its only reader), or None."""
    if len(step.bottoms) < 2 or len(set(step.bottoms)) != len(step.bottoms):
        return None
    # bottom 0 keeps the layer's order of additions; any bottom will do for two
    for i in ((0, 1) if len(step.bottoms) == 2 else (0,)):
        if isinstance(getattr(sole(step.bottoms[i]), "fn", None), FoldedLinear):
            return i
    return None


def _fold_chain(plan: list[Step], module: NetModule, pos: int, channels: int, readers,
                absorbed: set[int], fold: bool, fuse_relu: bool) -> Step | None:
    """Absorb the affine layers (and a final rectifier) that solely consume ``pos``'s top."""
    head = module.layers[plan[pos].index]
    scale = shift = None
    slope = None
    chain: list[int] = []
    producer, name = pos, plan[pos].tops[0]
    while True:
        who = readers[(producer, name)]
        if len(who) != 1 or who[0] < 0:
            break
        nxt = who[0]
        layer = plain_layer(module, plan[nxt])
        if layer is None or len(plan[nxt].bottoms) != 1 or \
                not name_free(plan, pos, nxt, plan[nxt].tops[0], chain):
            break
        affine = layer.affine(channels) if fold else None
        if affine is not None:
            a, s = affine
            scale, shift = (a, s) if scale is None else (scale * a, shift * a + s)
        elif fuse_relu and layer.rectifier_slope() is not None:
            slope = layer.rectifier_slope()
        else:
            break
        chain.append(nxt)
        producer, name = nxt, plan[nxt].tops[0]
        if slope is not None:
            break
    if not chain:
        return None
    absorbed.update(chain)
    return replace(plan[pos], tops=(name,), fn=FoldedLinear(head, scale, shift, slope),
                   full_precision=False)


def fusable(module: NetModule) -> bool:
    """True when ``module`` is a TEST net whose outputs a FusedNet may compute."""
    return module.phase == TEST


__all__ = ["FusedNet", "FoldedLinear", "InPlaceReLU", "InPlaceSum", "fused_for_inference",
           "fusable"]
