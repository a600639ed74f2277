"""The outputs-only fast path of pycaffe's ``Net.forward()``.

``net.forward()`` with no ``blobs=``/``start``/``end`` on a TEST net fed by Input layers runs
the fused inference net (BatchNorm/Scale folded into convolutions, in-place ReLUs,
``engine.net.fuse``) and copies only the outputs to their blobs; nothing else is copied to
the host. Every other blob is then *stale*: the first read of one (``data``, ``diff``,
``shape``), a ``backward`` or a partial ``forward`` first re-runs the full layer-by-layer
forward on the inputs the fast forward used, so every blob reads as Caffe would have left it.

Parameters: the fused net is rebuilt when a parameter tensor changed (``_version``) and, since
numpy writes through ``net.params[...][i].data`` bypass torch's version counter, whenever such
an array was handed out since the last fusion (``ParamViews``' generation counter) or is
still held by the caller.
"""
from __future__ import annotations

import weakref

import torch

from caffe_compat.engine.net.fuse import InferenceCache, fusable


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


def _numpy_state(params: list[torch.Tensor]) -> tuple[tuple, bool]:
    return PARAM_VIEWS.state(params)


class FastForward:
    """One net's fused forward, and the staleness of the blobs it did not write."""

    def __init__(self, net):
        self.net = net
        self.cache = InferenceCache(net.module)
        self._touched: tuple | None = None
        self._inputs: dict[str, torch.Tensor] | None = None

    def run(self) -> None:
        net = self.net
        params = self.cache.parameters()
        touched, held = _numpy_state(params)
        if held or touched != self._touched:
            self.cache.invalidate()
            self._touched = touched
        inputs = {n: self._snapshot(net.blobs[n].data) for n in net.inputs}
        outputs = self.cache.outputs_for(params, inputs)
        for name in net.outputs:
            net.blobs[name]._store(outputs[name])
        self._inputs = inputs
        net._traces.clear()
        skip = set(net.inputs) | set(net.outputs)
        for name, blob in net.blobs.items():
            if name not in skip:
                blob._refresh = self.materialize

    def _snapshot(self, array) -> torch.Tensor:
        """A private copy of an input blob, made straight in the layout the fused net runs
        (NHWC for 4-D inputs of a channels_last net: one copy instead of two)."""
        t = torch.from_numpy(array)
        layout = torch.channels_last if self.cache.channels_last and t.dim() == 4 \
            else torch.contiguous_format
        return torch.empty_like(t, memory_format=layout).copy_(t)

    def forget(self) -> None:
        """A full forward follows: the stale blobs will be overwritten, not recomputed."""
        self._inputs = None
        for blob in self.net.blobs.values():
            blob._refresh = None

    def materialize(self) -> None:
        """Give every blob its value: the full forward on the fast forward's inputs."""
        from caffe_compat._net_exec import forward_range
        inputs = self._inputs
        if inputs is None:
            return
        self.forget()
        net = self.net
        current = {n: net.blobs[n].data.copy() for n in inputs}
        for name, value in inputs.items():
            net.blobs[name].data = value.contiguous().numpy()
        try:
            forward_range(net, 0, len(net.module.layers) - 1, net._device())
        finally:
            for name, value in current.items():
                net.blobs[name].data = value
