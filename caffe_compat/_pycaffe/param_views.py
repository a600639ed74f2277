"""Which parameters handed numpy views of their data to the caller (pycaffe's fast.py).

numpy writes through ``net.params[...][i].data`` bypass torch's version counter, so the fast
forward learns of a possible weight edit from the hand-out itself; this registry counts them.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from caffe_compat._pycaffe.fast import FastForward


class ParamViews:
    """Which parameters handed numpy views of their data to the caller: per parameter a
    generation counter (bumped at each hand-out) and weak references to the arrays.

    Kept here, keyed by the parameter's id and checked against a weak reference to it, so
    nothing is written onto torch objects; one registry for the process, because nets that
    share parameters (``share_with``, a solver's test nets) see each other's hand-outs."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}    # id -> (ref to param, generation, array refs)
        self.handouts = 0        # hand-outs by any net, ever: unchanged = nothing new to check
        # fast forwards that left blobs stale: a view handed out may be written before the
        # stale blobs are read, and Caffe's blobs keep the values the forward's weights gave
        self._stale_forwards: weakref.WeakSet = weakref.WeakSet()

    def stale_until_handout(self, fast: "FastForward") -> None:
        self._stale_forwards.add(fast)

    def _entry(self, param: torch.Tensor):
        entry = self._entries.get(id(param))
        if entry is not None and entry[0]() is not param:     # a dead param's id reused
            del self._entries[id(param)]
            entry = None
        return entry

    def note(self, param: torch.Tensor, array) -> None:
        for fast in list(self._stale_forwards):
            if id(param) in fast.param_ids():
                self._stale_forwards.discard(fast)
                fast.net.blob_state.refresh()       # the stale blobs, from these weights
        entry = self._entry(param)
        generation, refs = (entry[1], entry[2]) if entry else (0, [])
        refs = [r for r in refs if r() is not None] + [weakref.ref(array)]
        key = id(param)
        self._entries[key] = (weakref.ref(param, lambda _, k=key: self._entries.pop(k, None)),
                              generation + 1, refs)
        self.handouts += 1

    def state(self, params: Sequence[torch.Tensor]) -> tuple[tuple, bool]:
        """(each param's generation, whether any handed-out array is still alive)."""
        entries = [self._entry(p) for p in params]
        generations = tuple(e[1] if e else 0 for e in entries)
        held = any(r() is not None for e in entries if e for r in e[2])
        return generations, held

    def held(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters among ``params`` with a handed-out array still alive."""
        return [p for p in params
                if (e := self._entry(p)) and any(r() is not None for r in e[2])]


PARAM_VIEWS = ParamViews()


def note_numpy_view(param: torch.nn.Parameter, array) -> None:
    """Remember that ``array`` (a numpy view of ``param``) was handed to the caller."""
    PARAM_VIEWS.note(param, array)


__all__ = ["ParamViews", "PARAM_VIEWS", "note_numpy_view"]
