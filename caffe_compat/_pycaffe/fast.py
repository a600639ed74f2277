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
an array was handed out since the last fusion (``ParamViews``' generation counter,
param_views.py) or one alive at the last forward was written since (its parameter's values
compared with a copy).

On CUDA (``set_mode_gpu``) the same path runs the fused net on the GPU, replayed from a CUDA
graph per input shape where the forward allows it (engine/net/inference_cache.py); engines
other than torch are CPU runtimes and are not offered there.

Engines (``caffe.Net(..., engine=...)``, engine/backends/engine.py): an onnxruntime or OpenVINO
engine plan (the fused plan with its exportable prefix as one runtime step, run by the one
executor) computes the outputs instead. The input blobs are copied straight into the
runtime's bound input buffers, which are also the snapshot a stale read recomputes from, so
a call costs one copy of the inputs and the runtime call (it writes the output blobs
itself); a call that repeats the one before is checked in a few comparisons (steady.py). A
runtime that fails on a call leaves that input shape on torch. The choice is per input
shape: the load's shape and shapes the net keeps coming back to (``PROMOTE_AFTER`` changes
to them, up to ``SHAPES_KEPT`` shapes) get an export of their own, chosen (``auto``:
measured) for them; one shape-generic export, chosen once, serves every other shape
(any_shape.py). The weights are the export's: after the net's parameters change it is
exported again once; a second change sends forwards to the torch path. A numpy view of a
parameter the caller keeps is compared with the parameter's values at each forward
(``_watch_views``): a write through it is such a change. A new hand-out is one too, unless
the parameter still holds the values the fused net or the export was made from (kept for
nets of up to ``REFERENCE_VALUES`` values): reading the weights between forwards costs
neither a fusion nor the engine.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from caffe_compat._pycaffe.any_shape import AnyShape
from caffe_compat._pycaffe.param_reference import _only_read, _reference
from caffe_compat._pycaffe.param_views import PARAM_VIEWS
from caffe_compat._pycaffe.steady import SteadyCall
from caffe_compat.engine.backends.engine import (EngineChoice, EnginePlan, ReducedForward,
                                                 choose_engine, first_call_check,
                                                 requested_as)
from caffe_compat.engine.net.fuse import fusable
from caffe_compat.engine.net.inference_cache import InferenceCache, summed_versions
from caffe_compat.formats.errors import first_line

log = logging.getLogger(__name__)


def eligible(net) -> bool:
    """A net whose plain ``forward()`` may take the fast path (fixed once it is built)."""
    m = net.module
    if not fusable(m) or m.net_param.force_backward:
        return False
    for index, layer in enumerate(m.layers):
        if layer.runs_user_code:
            return False                     # user code may read or write any blob
        if layer.draws_random:
            return False                     # a recompute of skipped blobs would draw anew
        if not m.layer_bottoms(index) and not layer.feeds_input:
            return False                     # data/DummyData sources: the full path
        if not m.layer_tops(index):
            return False                     # sinks (HDF5Output) act on every forward
    return True


SHAPES_KEPT = 4          # input shapes given a fixed-shape export: the load's, repeated ones
PROMOTE_AFTER = 3        # a shape gets one once the net has changed to it this many times
ENTRIES_KEPT = 4096      # shapes whose changes are counted (then counted afresh)


def inference_plan(net) -> EnginePlan | None:
    """The engine plan ``net.forward()`` runs now; None where it runs torch's fused plan."""
    fast = getattr(net, "_fast", None)
    choice = fast.choice if fast is not None else None
    forward = choice.forward if choice is not None else None
    return forward if isinstance(forward, EnginePlan) else None


class FastForward:
    """One net's fused forward; it marks the blobs it did not write stale in the net's
    ``BlobState``, with the recompute that gives them their values."""

    def __init__(self, net):
        self.net = net
        self.cache = InferenceCache(net.module, device=net.compute_device())
        self._touched: tuple | None = None
        self._fused_from = None       # _reference() of the values the fused net was made from
        self._fused_versions = -1     # and the parameters' summed versions then
        skip = set(net.inputs) | set(net.outputs)       # what a fast forward writes
        self._skipped = frozenset(n for n in net.blobs if n not in skip)
        self._outputs = tuple(net.module.output_names)
        self._handouts, self._ids, self._held = -1, (), True   # see _numpy_state
        self._params: tuple | None = None       # the parameter tuple ``_ids`` lists
        self._generations: tuple = ()  # what _numpy_state found last
        # (parameter, its values) for each parameter whose numpy view was alive at the last
        # forward: a write through the view shows as a difference; ``_edits`` counts those
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._edits = 0
        self._ran_at: dict[str, tuple] | None = None    # the last forward's input shapes
        self.choice = None            # engine/backends EngineChoice; None: torch
        self.request, self.precision = "torch", "fp32"
        self._engine_key: tuple | None = None
        self._resynced = False
        self._any: AnyShape | None = None         # for shapes without an export of their own
        self._entered: dict[tuple, int] = {}       # input shapes -> changes to them
        # input shapes -> (choice, engine key, _reference() of the values exported)
        self._by_shape: dict[tuple, tuple] = {}
        self._exported_from = None
        self._shapes: tuple = ()                    # the input shapes of ``choice``
        # the engine plan whose runtime writes straight into output blobs (``_direct``;
        # the others, ``_copied``, are copied in), and the BlobState arrays it was bound to
        self._bound: tuple = (None, -1)
        self._direct: tuple[str, ...] = ()
        self._copied = self._outputs
        self._steady: SteadyCall | None = None     # the last engine call, to repeat

    def _numpy_state(self, params: Sequence[torch.Tensor]) -> tuple[tuple, bool]:
        """``PARAM_VIEWS.state(params)``, skipped while no numpy view was handed out since a
        call that found none alive, for the same parameter tensors (a view, once dead, stays
        dead): 16 params cost ~15 us a call, a quarter of an MTCNN R-Net's forward."""
        if params is not self._params:          # ParameterWatch: a new tuple, new tensors
            self._params, self._ids = params, tuple(map(id, params))
        elif PARAM_VIEWS.handouts == self._handouts and not self._held:
            return self._generations, False
        generations, held = PARAM_VIEWS.state(params)
        self._handouts, self._held = PARAM_VIEWS.handouts, held
        self._generations = generations
        return generations, held

    def _weights_key(self, params: Sequence[torch.Tensor], touched: tuple) -> tuple:
        """What an engine's exported weights depend on: the tensors (``_numpy_state`` just
        listed their ids), their in-place versions (summed: each only grows, so the sum
        moves when any does), their numpy hand-outs and the writes through held views."""
        return self._ids, summed_versions(params), touched, self._edits

    @property
    def engine(self) -> str:
        return "torch" if self.choice is None else self.choice.name

    def _torch_forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.cache.outputs_for(self.cache.parameters(), inputs)

    def use_engine(self, request: str | None, precision: str = "fp32") -> None:
        """Pick the engine (``auto`` measures them) for the net's weights and input shapes."""
        self.request, self.precision = request, precision
        self._by_shape.clear()
        self._any = None
        if self.cache.on_cuda:
            # onnxruntime and OpenVINO run here on the CPU: never the faster choice for a
            # net whose weights live on the GPU, and their outputs would leave the device
            log.info("net '%s': engine torch on %s (CUDA graphs where the forward allows "
                     "them; engines %s and precision %s serve CPU nets)", self.net.module.name,
                     self.cache.device, request, precision)
            self.choice = None
            return
        self._decide(request)

    def _decide(self, request: str | None) -> None:
        params = self.cache.parameters()
        shapes = {n: tuple(self.net.blob_state.get(n).shape) for n in self.net.inputs}
        self.choice = choose_engine(self.net.module, request, self._torch_forward,
                                    precision=self.precision, shapes=shapes)
        self._engine_key = self._weights_key(params, self._numpy_state(params)[0])
        self._exported_from = _reference(params)
        self._shapes = tuple(shapes.values())
        self._by_shape[self._shapes] = (self.choice, self._engine_key, self._exported_from)
        log.info("net '%s': %s", self.net.module.name, self.choice.reason)

    def _engine_plan(self, params, touched: tuple) -> EnginePlan | None:
        """The chosen engine plan, its inputs copied in; None where torch must run."""
        choice = self.choice
        if choice is None:
            return None
        if choice.forward.__class__ is not EnginePlan:
            # torch chosen for these shapes: another shape may have its own choice
            if self._by_shape and self._input_shapes() != self._shapes:
                self._reshaped()
                return self._engine_plan(params, touched)
            return None
        plan, get = choice.forward, self.net.blob_state.get
        key = self._weights_key(params, touched)
        if key != self._engine_key:                                  # changed since export?
            if not self._reads_since_export(params, key):
                return self._resync(params, touched)
            self._engine_key = key
        for name, bound in plan.input_arrays.items():
            host = get(name)
            if host.shape != bound.shape:
                self._reshaped()                        # another shape: another choice
                return self._engine_plan(params, touched)
            np.copyto(bound, host)      # the snapshot a stale read recomputes from, too
        return plan

    def _resync(self, params, touched: tuple) -> EnginePlan | None:
        """The weights changed since the export: export again, once; then torch."""
        if self._resynced:
            log.info("net '%s': weights changed again; engine torch from now on",
                     self.net.module.name)
            self.choice = None
            return None
        self._resynced = True
        self._by_shape.clear()
        self._any = None
        self._decide(requested_as(self.choice.name))
        return self._engine_plan(params, touched)

    def _reads_since_export(self, params, key: tuple) -> bool:
        """Whether the weights key moved only by numpy hand-outs that left the values the
        export was made from (same tensors, versions and writes through held views)."""
        old = self._engine_key
        return (key[0], key[1], key[3]) == (old[0], old[1], old[3]) and \
            _only_read(self._exported_from, params, old[2], key[2])

    def _input_shapes(self) -> tuple:
        return tuple(tuple(self.net.blob_state.get(n).shape) for n in self.net.inputs)

    def _reshaped(self) -> None:
        shapes = self._input_shapes()
        kept = self._by_shape.get(shapes)
        if kept is not None:
            self.choice, self._engine_key, self._exported_from = kept
            self._shapes = shapes
            return
        entered = self._entered[shapes] = self._entered.get(shapes, 0) + 1
        if len(self._entered) > ENTRIES_KEPT:
            self._entered.clear()
        if len(self._by_shape) < SHAPES_KEPT and (entered >= PROMOTE_AFTER or not self._by_shape):
            self._decide(self.request)       # a shape that keeps coming back: its own export
        else:
            # a new shape: one shape-generic export, chosen once, serves every shape without
            # one of its own. An export and a timing per new shape cost a folder of photos
            # one per photo; forgetting choices to make room exported again on every call of
            # a cycle
            if self._any is None:
                self._any = self._decide_any_shape(shapes)
            self.choice = self._any.choice_for(dict(zip(self.net.inputs, shapes)))
            self._engine_key, self._exported_from = self._any.key, self._any.exported_from
            self._shapes = shapes

    def _decide_any_shape(self, shapes: tuple) -> AnyShape:
        params = self.cache.parameters()
        choice = choose_engine(self.net.module, self.request, self._torch_forward,
                               precision=self.precision,
                               shapes=dict(zip(self.net.inputs, shapes)), any_shape=True)
        choice.reason = f"input shapes without an export of their own: {choice.reason}"
        log.info("net '%s': %s", self.net.module.name, choice.reason)
        return AnyShape(choice, self._weights_key(params, self._numpy_state(params)[0]),
                        _reference(params))

    def run(self) -> None:
        steady = self._steady
        if steady is not None and steady.holds(self, PARAM_VIEWS.handouts):
            try:
                return steady()          # the last engine call again (steady.py)
            except Exception:   # noqa: BLE001 - the full path runs it again, and decides
                pass
        self._steady = None
        net = self.net
        params = self.cache.parameters()
        touched, held = self._numpy_state(params)
        self._watch_views(params, touched, held)
        plan = self._engine_plan(params, touched)
        state = net.blob_state
        if plan is not None:
            if self._bound[0] is not plan or self._bound[1] != state.arrays_replaced:
                self._bind(plan)
            inputs = plan.inputs
            try:
                outputs = plan.run(inputs)
            except Exception as exc:   # noqa: BLE001 - a runtime's errors come in many types
                failure = f"{self.choice.name} failed ({first_line(exc, 200)})"
                outputs = self._to_torch(inputs, failure)
            else:
                if not self.choice.verified:
                    outputs = self._checked(outputs, inputs)
            state.written(self._direct)
            copied = self._copied
        else:
            inputs = {n: self._snapshot(state.get(n)) for n in net.inputs}
            choice = self.choice
            if choice is not None and isinstance(choice.forward, ReducedForward):
                outputs = choice.forward(inputs)
                if not choice.verified:       # bf16 is held to its tolerance as engines are
                    outputs = self._checked(outputs, inputs)
            else:
                outputs = self.cache.outputs_for(params, inputs)
            copied = self._outputs
        for name in copied:
            state.put(name, outputs[name])
        recompute = lambda: self.materialize(inputs)        # noqa: E731
        state.mark_stale(self._skipped, recompute)
        if self._skipped:
            PARAM_VIEWS.stale_until_handout(self)
        self._ran_at = {n: tuple(t.shape) for n, t in inputs.items()}
        if plan is not None and SteadyCall.possible(self, plan):
            self._steady = SteadyCall(self, plan, params, self._engine_key[1],
                                      PARAM_VIEWS.handouts, recompute)

    def _watch_views(self, params: Sequence[torch.Tensor], touched: tuple, held: bool) -> None:
        """Re-fuse after a new hand-out of a numpy view or a write through one alive at the
        last forward (numpy writes bypass torch's version counter): a held view left
        unwritten costs a comparison of its parameter, not a fusion per call, and so does a
        new hand-out that only read (for nets small enough to keep a copy: REFERENCE_VALUES)."""
        edited = any(not torch.equal(p, values) for p, values in self._copies)
        self._edits += edited
        if edited or touched != self._touched:
            # a torch write since (versions moved) re-fused from other values: no shortcut
            versions = summed_versions(params)
            if edited or versions != self._fused_versions or \
                    not _only_read(self._fused_from, params, self._touched, touched):
                self.cache.invalidate()
                self._fused_from = _reference(params)        # what the next fusion reads
                self._fused_versions = versions
            self._touched = touched
            self._copies = [(p, p.detach().clone()) for p in PARAM_VIEWS.held(params)] \
                if held else []
        elif not held:
            self._copies = []        # a view made from now on is a hand-out: touched moves

    def param_ids(self) -> tuple[int, ...]:
        """The ids of the parameters the last forward used."""
        return self._ids

    def ran_at(self, shapes: dict) -> bool:
        """Whether the last forward ran at these input shapes."""
        return self._ran_at == {n: tuple(s) for n, s in shapes.items()}

    def ran_at_shapes(self) -> dict[str, tuple]:
        """The input shapes of the last forward (it ran, or no blob would be stale)."""
        return dict(self._ran_at or {})

    def _bind(self, plan: EnginePlan) -> None:
        """The runtime writes the output blobs' host arrays itself (not under ``lazy``,
        whose values stay pending on their device)."""
        state = self.net.blob_state
        arrays = {} if state.lazy else {n: state.host_data(n) for n in self._outputs}
        self._direct = tuple(plan.bind_outputs(arrays))
        self._copied = tuple(n for n in self._outputs if n not in self._direct)
        self._bound = (plan, state.arrays_replaced)

    def _checked(self, outputs, inputs):
        """The first real call's outputs, checked against torch's (torch's if they differ)."""
        choice = self.choice
        want = self._torch_forward(inputs)
        if not all(bool(t.isfinite().all()) for t in want.values()):
            # a NaN or inf input (a corrupt first image) tells nothing about the engine:
            # this call gets torch's values, the next finite one decides
            for name in self._direct:
                outputs[name].copy_(want[name])
            return {**outputs, **want}
        self.choice = first_call_check(choice, outputs, want)
        if self.choice is choice:
            if self._any is not None and self._any.owns(choice):
                self._any.passed += 1
            return outputs
        return self._to_torch(inputs, None, want)

    def _to_torch(self, inputs, failure: str | None, want=None):
        """Torch from now on at these input shapes (``failure``: why, for the log), and
        torch's outputs for this call."""
        if failure is not None:
            log.warning("net '%s': engine %s at %s; using torch", self.net.module.name,
                        failure, [tuple(t.shape) for t in inputs.values()])
            self.choice = EngineChoice("torch", None, f"engine torch: {failure}",
                                       verified=True)
        self._by_shape.clear()
        self._direct, self._copied = (), self._outputs      # torch's values are put
        return self._torch_forward(inputs) if want is None else want

    def _snapshot(self, array) -> torch.Tensor:
        """A private copy of an input blob, made straight in the layout the fused net runs
        (NHWC for 4-D inputs of a channels_last net: one copy instead of two)."""
        t = torch.from_numpy(array)
        if self.cache.on_cuda:      # pinned: the copy to the GPU does not block the host
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        layout = torch.channels_last if self.cache.channels_last and t.dim() == 4 \
            else torch.contiguous_format
        return torch.empty_like(t, memory_format=layout).copy_(t)

    def materialize(self, inputs: dict[str, torch.Tensor]) -> None:
        """Give every blob its value: the full forward on the fast forward's ``inputs``
        (run by the net's BlobState when a stale blob is first read)."""
        from caffe_compat._pycaffe.layerwise import forward_range
        net, state = self.net, self.net.blob_state
        state.clear_stale()
        # the blobs the fast forward wrote keep their arrays and values: an input reshaped
        # since (``net.reshape`` reads the stale blobs while it reshapes them) takes the
        # forward's shape and back; an output keeps what the forward returned, or what the
        # caller wrote into it since (a read runs nothing in Caffe)
        kept = state.hold(dict.fromkeys([*inputs, *self._outputs]))
        for name, value in inputs.items():
            state.put(name, value.contiguous())
        # a view held across the forward and written since: the recompute takes the
        # forward's weights (its copy in ``_copies``), and the caller's edit comes back after
        edited = [(p, values, p.detach().clone()) for p, values in self._copies
                  if not torch.equal(p, values)]
        try:
            with torch.no_grad():
                for param, values, _ in edited:
                    param.copy_(values)
            forward_range(net, 0, len(net.module.layers) - 1, net.compute_device(),
                          callbacks=False)
        finally:
            with torch.no_grad():
                for param, _, edit in edited:
                    param.copy_(edit)
            state.restore(kept)

