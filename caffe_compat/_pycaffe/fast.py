"""The outputs-only fast path of pycaffe's ``Net.forward()``.

``net.forward()`` with no ``blobs=``/``start``/``end`` on a TEST net fed by Input layers runs
the fused inference net (BatchNorm/Scale folded into convolutions, in-place ReLUs,
``engine.net.fuse``) and copies only the outputs to their blobs; nothing else is copied to
the host. Every other blob is then *stale* (marked so in the net's ``BlobState``): the first
read of one (``data``, ``diff``, ``shape``), a ``backward`` or a partial ``forward`` first
re-runs the full layer-by-layer forward on the inputs the fast forward used, so every blob
reads as Caffe would have left it.

Parameters: the fused net is rebuilt when a parameter tensor changed (``_version``) and, since
numpy writes through ``net.params[...][i].data`` bypass torch's version counter, whenever such
an array was handed out since the last fusion (``ParamViews``' generation counter) or is
still held by the caller.

Engines (``caffe.Net(..., engine=...)``, engine/backends/engine.py): an onnxruntime or OpenVINO
engine computes the outputs instead of the fused net. Its weights are the export's: after
the net's parameters change it is exported again once; a second change, or a numpy view of a
parameter still held by the caller, sends forwards to the torch path.
"""
from __future__ import annotations

import logging
import weakref

import torch

from caffe_compat.engine.backends.engine import (ExportedForward, ReducedForward, choose_engine,
                                                 first_call_check)
from caffe_compat.engine.net.fuse import InferenceCache, fusable

log = logging.getLogger(__name__)


def eligible(net) -> bool:
    """A net whose plain ``forward()`` may take the fast path (fixed once it is built)."""
    m = net.module
    if not fusable(m) or m.net_param.force_backward:
        return False
    for index, layer in enumerate(m.layers):
        if layer.runs_user_code:
            return False                     # user code may read or write any blob
        if not m.layer_bottoms(index) and not layer.feeds_input:
            return False                     # data/DummyData sources: the full path
        if not m.layer_tops(index):
            return False                     # sinks (HDF5Output) act on every forward
    return True


class ParamViews:
    """Which parameters handed numpy views of their data to the caller: per parameter a
    generation counter (bumped at each hand-out) and weak references to the arrays.

    Kept here, keyed by the parameter's id and checked against a weak reference to it, so
    nothing is written onto torch objects; one registry for the process, because nets that
    share parameters (``share_with``, a solver's test nets) see each other's hand-outs."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}    # id -> (ref to param, generation, array refs)
        self.handouts = 0        # hand-outs by any net, ever: unchanged = nothing new to check

    def _entry(self, param: torch.Tensor):
        entry = self._entries.get(id(param))
        if entry is not None and entry[0]() is not param:     # a dead param's id reused
            del self._entries[id(param)]
            entry = None
        return entry

    def note(self, param: torch.Tensor, array) -> None:
        entry = self._entry(param)
        generation, refs = (entry[1], entry[2]) if entry else (0, [])
        refs = [r for r in refs if r() is not None] + [weakref.ref(array)]
        key = id(param)
        self._entries[key] = (weakref.ref(param, lambda _, k=key: self._entries.pop(k, None)),
                              generation + 1, refs)
        self.handouts += 1

    def state(self, params: list[torch.Tensor]) -> tuple[tuple, bool]:
        """(each param's generation, whether any handed-out array is still alive)."""
        entries = [self._entry(p) for p in params]
        generations = tuple(e[1] if e else 0 for e in entries)
        held = any(r() is not None for e in entries if e for r in e[2])
        return generations, held


PARAM_VIEWS = ParamViews()


def note_numpy_view(param: torch.nn.Parameter, array) -> None:
    """Remember that ``array`` (a numpy view of ``param``) was handed to the caller."""
    PARAM_VIEWS.note(param, array)


def _engine_key(params: list[torch.Tensor], touched: tuple) -> tuple:
    """What the engine's exported weights depend on: the tensors, their in-place versions and
    their numpy hand-outs (``touched``: the generations ``_numpy_state`` gives)."""
    return tuple(map(id, params)), [p._version for p in params], touched


def _numpy_state(params: list[torch.Tensor]) -> tuple[tuple, bool]:
    return PARAM_VIEWS.state(params)


class FastForward:
    """One net's fused forward; it marks the blobs it did not write stale in the net's
    ``BlobState``, with the recompute that gives them their values."""

    def __init__(self, net):
        self.net = net
        self.cache = InferenceCache(net.module)
        self._touched: tuple | None = None
        skip = set(net.inputs) | set(net.outputs)       # what a fast forward writes
        self._skipped = frozenset(n for n in net.blobs if n not in skip)
        self._handouts, self._ids, self._held = -1, (), True   # see _numpy_state
        self._generations: tuple = ()  # what _numpy_state found last
        self.choice = None            # engine/backends EngineChoice; None: torch
        self.precision = "fp32"
        self._engine_key: tuple | None = None
        self._resynced = False

    def _numpy_state(self, params: list[torch.Tensor]) -> tuple[tuple, bool]:
        """``_numpy_state(params)``, skipped while no numpy view was handed out since a call
        that found none alive, for the same parameter tensors (a view, once dead, stays
        dead): 16 params cost ~15 us a call, a quarter of an MTCNN R-Net's forward."""
        ids = tuple(map(id, params))
        if PARAM_VIEWS.handouts == self._handouts and ids == self._ids and not self._held:
            return self._generations, False
        generations, held = _numpy_state(params)
        self._handouts, self._ids, self._held = PARAM_VIEWS.handouts, ids, held
        self._generations = generations
        return generations, held

    @property
    def engine(self) -> str:
        return "torch" if self.choice is None else self.choice.name

    def use_engine(self, request: str | None, precision: str = "fp32") -> None:
        """Pick the engine (``auto`` measures them) for the net's current weights."""
        params = self.cache.parameters()
        self.precision = precision
        self.choice = choose_engine(self.net.module, request,
                                    lambda inputs: self.cache.outputs_for(params, inputs),
                                    precision=precision)
        self._engine_key = _engine_key(params, self._numpy_state(params)[0])
        log.info("net '%s': %s", self.net.module.name, self.choice.reason)

    def _engine_outputs(self, params, inputs, touched: tuple, held: bool):
        """The chosen engine's outputs, or None where the torch path must run."""
        choice = self.choice
        if choice is None or choice.forward is None or held or not choice.forward.accepts(inputs):
            return None
        if _engine_key(params, touched) != self._engine_key:       # weights changed since the export
            if self._resynced:
                log.info("net '%s': weights changed again; engine torch from now on",
                         self.net.module.name)
                self.choice = None
                return None
            self._resynced = True
            self.use_engine(choice.name.replace(ReducedForward.name, "torch"), self.precision)
            return self._engine_outputs(params, inputs, touched, held)
        outputs = choice.forward(inputs)
        if not choice.verified:
            want = self.cache.outputs_for(params, inputs)
            self.choice = first_call_check(choice, outputs, want)
            return outputs if self.choice is choice else want
        return outputs

    def run(self) -> None:
        net = self.net
        params = self.cache.parameters()
        touched, held = self._numpy_state(params)
        if held or touched != self._touched:
            self.cache.invalidate()
            self._touched = touched
        inputs = {n: self._snapshot(net.blobs[n].data) for n in net.inputs}
        outputs = self._engine_outputs(params, inputs, touched, held)
        if outputs is None:
            outputs = self.cache.outputs_for(params, inputs)
        state = net.blob_state
        for name in net.module.output_names:
            state.put(name, outputs[name])
        state.mark_stale(self._skipped, lambda: self.materialize(inputs))

    def _snapshot(self, array) -> torch.Tensor:
        """A private copy of an input blob, made straight in the layout the fused net runs
        (NHWC for 4-D inputs of a channels_last net: one copy instead of two)."""
        if self.choice is not None and isinstance(self.choice.forward, ExportedForward):
            return torch.from_numpy(array.copy())     # an engine takes NCHW arrays as they are
        t = torch.from_numpy(array)
        on_torch = self.choice is None or self.choice.forward is None or \
            isinstance(self.choice.forward, ReducedForward)
        nhwc = self.cache.channels_last and on_torch
        layout = torch.channels_last if nhwc and t.dim() == 4 \
            else torch.contiguous_format
        return torch.empty_like(t, memory_format=layout).copy_(t)

    def materialize(self, inputs: dict[str, torch.Tensor]) -> None:
        """Give every blob its value: the full forward on the fast forward's ``inputs``
        (run by the net's BlobState when a stale blob is first read)."""
        from caffe_compat._pycaffe.layerwise import forward_range
        net = self.net
        net.blob_state.clear_stale()
        current = {n: net.blobs[n].data.copy() for n in inputs}
        for name, value in inputs.items():
            net.blobs[name].data = value.contiguous().numpy()
        try:
            forward_range(net, 0, len(net.module.layers) - 1, net.compute_device())
        finally:
            for name, value in current.items():
                net.blobs[name].data = value
