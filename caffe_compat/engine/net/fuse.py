"""Inference fusion: a TEST-phase NetModule rewritten to compute its outputs with fewer ops.

``fused_for_inference(module)`` returns a new ``FusedNet`` and leaves ``module`` untouched:

- a Convolution or InnerProduct followed by any chain of BatchNorm (global statistics),
  Scale and Bias (learned per-channel operands) becomes one convolution whose weights and
  bias carry the affine map: for output channel c, ``y = a_c * (W_c * x + b_c) + s_c``
  folds to ``W'_c = a_c W_c`` and ``b'_c = a_c b_c + s_c`` (computed in float64);
- a ReLU after it runs in place on the convolution's fresh output (no second tensor), and so
  does a ReLU that alone reads the new tensor of an Eltwise, Concat or Pooling; an Eltwise
  SUM accumulates into such a convolution output when nothing else reads it;
- TEST-phase Dropout and Split are aliases (no op at all);
- every other layer runs as the original layer object (same parameters).

A chain is only folded when each intermediate value has exactly one consumer (Caffe's
Split insertion guarantees fan-out shows up as a Split) and is not an output, so the fused
net's outputs are the original's. Intermediate blobs are not kept: use the NetModule itself
(``run``) when every blob is wanted.

Folded weights are a snapshot. ``InferenceCache`` re-fuses when a parameter tensor of the
original changes (torch's in-place version counter, bumped by ``copy_``/``weights.copy_from``
and the solver's updates); writes that bypass torch (a numpy view's ``a[...] = v``) must call
``InferenceCache.invalidate()``.

``frozen_for_inference(fused, inputs)`` additionally traces, freezes and runs
``torch.jit.optimize_for_inference`` (oneDNN weight prepacking, conv+ReLU fusion); whether
that wins is per net and per machine, so the benchmark suite measures it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from caffe_compat.engine.layers.base import TEST, Layer
from caffe_compat.engine.net.fast_ops import specialize
from caffe_compat.engine.net.folded import FoldedLinear, InPlaceReLU, InPlaceSum, affine_of
from caffe_compat.engine.net.module import _REDUCED, NetModule, _in_float32, _mark_releases
from caffe_compat.engine.net.train_fuse import name_free, plan_readers
from caffe_compat.proto import caffe_pb2

_AFFINE = ("BatchNorm", "Scale", "Bias")


@dataclass
class _Op:
    """One step of the fused plan: ``fn`` (None = alias top to bottom) on named blobs."""
    fn: Callable | None
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    full_precision: bool = False
    release: tuple[str, ...] = ()

    def __post_init__(self):
        # Modules are called through ``forward``: nn.Module.__call__'s hook checks cost more
        # than a small layer on a batch-1 forward, and nobody hooks a fused plan.
        self.call = self.fn.forward if isinstance(self.fn, nn.Module) else self.fn

    @property
    def simple(self) -> bool:
        """One bottom, one top, no float32 guard needed."""
        return self._simple

    def seal(self) -> None:
        """Fix ``simple`` once the plan is final (the executor reads it on every call)."""
        single = len(self.bottoms) == 1 and len(self.tops) == 1 and self.fn is not None
        self._simple = single and not self.full_precision


_SEQUENCES = (tuple, list)

# Layers whose output is always a new tensor (never a view of a bottom) given >= 2 bottoms
# (Pooling: one); a ReLU that is the sole reader of such an output may run in place.
_FRESH = {"Eltwise": 2, "Concat": 2, "Pooling": 1}


def _is_alias(layer: Layer) -> bool:
    return layer.is_alias


def _foldable_head(layer: Layer, module: NetModule, top: str) -> int | None:
    """Output channels of a Convolution/InnerProduct whose affine map can be folded."""
    if layer.type == "Convolution" and len(layer.param.bottom) == 1 and layer.axis == 1:
        return layer.num_output
    if layer.type == "InnerProduct" and layer.axis == 1 and len(module.blob_shapes[top]) == 2:
        return layer.num_output
    return None


class FusedNet(nn.Module):
    """The fused plan of a NetModule: ``forward(*inputs)`` (in ``input_names`` order) returns
    the output tensors in ``output_names`` order; ``outputs(**inputs)`` returns a dict."""

    def __init__(self, module: NetModule, ops: list[_Op]):
        super().__init__()
        self.name = module.name
        self.input_names = list(module.input_names)
        self.output_names = list(module.output_names)
        self.ops = ops
        self.steps = nn.ModuleList(op.fn for op in ops if isinstance(op.fn, nn.Module))
        _mark_releases(self.ops, set(self.output_names))
        for op in self.ops:
            op.seal()

    channels_last = False

    def use_channels_last(self) -> None:
        """NHWC weights for this net's own 2-D convolutions, NHWC 4-D inputs."""
        self.channels_last = True
        for op in self.ops:
            if isinstance(op.fn, FoldedLinear) and op.fn.weight.dim() == 4:
                op.fn.weight.data = op.fn.weight.data.contiguous(memory_format=torch.channels_last)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.channels_last:
            inputs = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4
                           else t for t in inputs)
        blobs = dict(zip(self.input_names, inputs))
        for op in self.ops:
            if op.simple:                  # one bottom, one top: most layers of a net
                out = op.call(blobs[op.bottoms[0]])
                blobs[op.tops[0]] = out[0] if out.__class__ in _SEQUENCES else out
                for b in op.release:
                    del blobs[b]
                continue
            args = [blobs[b] for b in op.bottoms]
            if op.fn is None:
                out = args if len(op.tops) == 1 else args * len(op.tops)
            elif op.full_precision and any(t.dtype in _REDUCED for t in args):
                out = _in_float32(op.fn, args)
            else:
                out = op.call(*args)
            if not isinstance(out, (tuple, list)):
                out = (out,)
            for t, value in zip(op.tops, out):
                blobs[t] = value
            for b in op.release:
                del blobs[b]
        return tuple(blobs[name] for name in self.output_names)

    def outputs(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.name}: input blob(s) {', '.join(missing)} were not fed")
        values = self(*(inputs[n] for n in self.input_names))
        return dict(zip(self.output_names, values))


def fused_for_inference(module: NetModule, fold: bool = True, fuse_relu: bool = True,
                        channels_last: bool = False) -> FusedNet:
    """A FusedNet computing ``module``'s outputs (see the module docstring).

    ``channels_last``: every 2-D convolution gets its own NHWC copy of its weights and 4-D
    inputs are fed NHWC, so oneDNN runs every convolution in its blocked layout (PyTorch
    otherwise sends batch-1 1x1 convolutions to its slow im2col path)."""
    plan = module._plan
    consumers = plan_readers(module)
    absorbed: set[int] = set()
    ops: list[_Op] = []
    for pos, step in enumerate(plan):
        if pos in absorbed:
            continue
        layer = module.layers[step.index]
        if layer.type == "Input":
            continue
        if _is_alias(layer):
            ops.append(_Op(None, step.bottoms, step.tops))
            continue
        channels = _foldable_head(layer, module, step.tops[0]) \
            if (fold or fuse_relu) and step.tops else None
        if channels is not None:
            op = _fold_chain(module, pos, channels, consumers, absorbed, fold, fuse_relu)
            if op is not None:
                ops.append(op)
                continue
        if channels_last and channels is not None and layer.type == "Convolution":
            ops.append(_Op(FoldedLinear(layer, None, None, None), step.bottoms, step.tops))
            continue
        ops.append(_Op(layer, step.bottoms, step.tops, layer.full_precision))
    if fuse_relu:
        _in_place(ops, set(module.output_names) | set(module.loss_weights))
    _specialize(ops, module)
    fused = FusedNet(module, ops)
    if channels_last:
        fused.use_channels_last()
    return fused


def _specialize(ops: list[_Op], module: NetModule) -> None:
    """Layer calls specialised for the planned blob shapes (engine/net/fast_ops.py)."""
    for op in ops:
        if isinstance(op.fn, Layer):
            fast = specialize(op.fn, [module.blob_shapes[b] for b in op.bottoms])
            if fast is not None:
                op.call = fast


def _in_place(ops: list[_Op], kept: set[str]) -> None:
    """Ops of the plan that may reuse a bottom's memory: a ReLU reading the new tensor of an
    Eltwise, Concat or Pooling, and an Eltwise SUM (coeffs 1) with a bottom that a
    FoldedLinear just made (ResNet's residual sums: the branch's last convolution), when
    nothing else reads that tensor.

    Reads are counted on the fused plan itself, per written version; an alias op (Split,
    Dropout) counts as a reader, so a tensor seen under two names is never written."""
    writer: dict[str, int] = {}
    reads: dict[tuple[int, str], int] = {}
    for pos, op in enumerate(ops):
        for b in op.bottoms:
            key = (writer.get(b, -1), b)
            reads[key] = reads.get(key, 0) + 1
        for t in op.tops:
            writer[t] = pos
    for name in kept:
        key = (writer.get(name, -1), name)
        reads[key] = reads.get(key, 0) + 1
    writer.clear()

    def sole(name: str) -> _Op | None:
        """The op that wrote ``name``, if the op being looked at is its only reader."""
        source = writer.get(name)
        return None if source is None or reads.get((source, name)) != 1 else ops[source]

    for pos, op in enumerate(ops):
        kind = getattr(op.fn, "type", None)
        if kind == "ReLU" and len(op.bottoms) == 1 and _fresh(sole(op.bottoms[0])):
            ops[pos] = _Op(InPlaceReLU(op.fn), op.bottoms, op.tops)
        elif kind == "Eltwise":
            into = _sum_target(op, sole)
            if into is not None:
                ops[pos] = _Op(InPlaceSum(op.fn, into), op.bottoms, op.tops)
        for t in op.tops:
            writer[t] = pos


def _fresh(op: _Op | None) -> bool:
    """``op`` returns a new tensor of an Eltwise, Concat or Pooling (see ``_FRESH``)."""
    if op is None:
        return False
    if isinstance(op.fn, InPlaceSum):
        return True                      # an Eltwise that reuses a tensor only it read
    needed = _FRESH.get(getattr(op.fn, "type", None))
    return needed is not None and len(op.bottoms) >= needed


def _sum_target(op: _Op, sole) -> int | None:
    """The bottom an Eltwise SUM may accumulate into (``sole(name)``: the writer of that
    bottom when this op is its only reader), or None."""
    layer = op.fn
    if len(op.bottoms) < 2 or layer.operation != caffe_pb2.EltwiseParameter.SUM \
            or set(layer.coeff) != {1.0} or len(set(op.bottoms)) != len(op.bottoms):
        return None
    # bottom 0 keeps the layer's order of additions; any bottom will do for two
    for i in ((0, 1) if len(op.bottoms) == 2 else (0,)):
        if isinstance(getattr(sole(op.bottoms[i]), "fn", None), FoldedLinear):
            return i
    return None


def _fold_chain(module: NetModule, pos: int, channels: int, consumers, absorbed: set[int],
                fold: bool, fuse_relu: bool) -> _Op | None:
    """Absorb the affine layers (and a final ReLU) that solely consume ``pos``'s top."""
    plan = module._plan
    head = module.layers[plan[pos].index]
    scale = shift = None
    slope = None
    chain: list[int] = []
    producer, name = pos, plan[pos].tops[0]
    while True:
        readers = consumers[(producer, name)]
        if len(readers) != 1 or readers[0] < 0:
            break
        nxt = readers[0]
        layer = module.layers[plan[nxt].index]
        if len(plan[nxt].bottoms) != 1 or not name_free(plan, pos, nxt, plan[nxt].tops[0], chain):
            break
        if layer.type in _AFFINE and fold:
            affine = affine_of(layer, channels)
            if affine is None:
                break
            a, s = affine
            scale, shift = (a, s) if scale is None else (scale * a, shift * a + s)
        elif layer.type == "ReLU" and fuse_relu:
            slope = layer.negative_slope
        else:
            break
        chain.append(nxt)
        producer, name = nxt, plan[nxt].tops[0]
        if slope is not None:
            break
    if not chain:
        return None
    absorbed.update(chain)
    return _Op(FoldedLinear(head, scale, shift, slope), plan[pos].bottoms, (name,))


def frozen_for_inference(fused: FusedNet, example_inputs: Sequence[torch.Tensor]):
    """``fused`` traced, frozen and optimized by TorchScript for these input shapes.

    Raises RuntimeError naming the net when it cannot be traced (a Python layer, say)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shapes are fixed
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(fused.eval(), tuple(example_inputs), check_trace=False)
            frozen = torch.jit.freeze(traced)
            return torch.jit.optimize_for_inference(frozen)
    except Exception as exc:   # noqa: BLE001 - tracing errors come in many types
        raise RuntimeError(f"net '{fused.name}' cannot be frozen with TorchScript: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           ) from exc


class ParameterWatch:
    """Lists a net's parameter tensors fast enough to check on every batch-1 forward.

    Holds each layer's ParameterList dict (mutated in place when a blob is shared or
    replaced): reading those is ~20x cheaper than iterating ``layer.blobs``, which goes
    through ``getattr`` per layer and per item (1 ms per forward on GoogLeNet)."""

    def __init__(self, module: NetModule):
        self._dicts = [layer.blobs._parameters for layer in module.layers]

    def __call__(self) -> list[torch.Tensor]:
        return [p for d in self._dicts for p in d.values()]


def _param_versions(params: list[torch.Tensor]) -> tuple:
    return tuple((id(p), p._version) for p in params)


class InferenceCache:
    """The fast path for an outputs-only forward of a TEST net (the pycaffe hook).

    ``outputs(**inputs)`` runs a FusedNet under ``no_grad``, re-fusing whenever a parameter
    of ``module`` was replaced or modified in place since the last fusion. The FusedNet is
    channels_last (NHWC) by default: faster than NCHW on every net of the benchmark suite on
    the CPUs measured (benchmarks/NOTES.md); a net whose layers refuse NHWC tensors falls back
    to NCHW for good on its first call."""

    def __init__(self, module: NetModule, channels_last: bool = True):
        self.module = module
        self.channels_last = channels_last
        self.parameters = ParameterWatch(module)
        self._fused: FusedNet | None = None
        self._versions: tuple = ()

    def invalidate(self) -> None:
        self._fused = None

    @property
    def fused(self) -> FusedNet:
        return self.fused_for(self.parameters())

    def fused_for(self, params: list[torch.Tensor]) -> FusedNet:
        """The FusedNet, re-fused if ``params`` (``self.parameters()``) changed."""
        versions = _param_versions(params)
        if self._fused is None or versions != self._versions:
            self._fused = fused_for_inference(self.module, channels_last=self.channels_last)
            self._versions = versions
        return self._fused

    def outputs(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.outputs_for(self.parameters(), inputs)

    def outputs_for(self, params: list[torch.Tensor], inputs: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
        """``outputs(**inputs)`` for a caller that already holds ``self.parameters()``."""
        with torch.no_grad():
            try:
                return self.fused_for(params).outputs(**inputs)
            except RuntimeError:            # a layer that needs NCHW memory: use that from now
                if not self.channels_last:
                    raise
                self.channels_last = False
                self.invalidate()
                return self.fused_for(params).outputs(**inputs)


def fusable(module: NetModule) -> bool:
    """True when ``module`` is a TEST net whose outputs a FusedNet may compute."""
    return module.phase == TEST


__all__ = ["FusedNet", "FoldedLinear", "InPlaceReLU", "InPlaceSum", "InferenceCache", "fused_for_inference",
           "frozen_for_inference", "fusable", "ParameterWatch"]
