"""Where each blob of a pycaffe ``Net`` has its current value: one ``BlobState`` per Net.

A blob's ``data`` (and, separately, its ``diff``) is in one of three places:

- **host**: its stable float32 numpy array (Caffe's CPU memory); arrays handed out earlier
  keep showing the latest values because new values are copied into them;
- **pending**: a tensor the engine produced and left on its device (a GPU, or any device
  when ``lazy`` is set), copied into the host array on the first read (Caffe's
  SyncedMemory); a layer reading the blob on that device takes the tensor directly;
- **stale**: the blob was skipped by the outputs-only fast forward; the first read of any
  stale blob runs ``recompute`` (the full forward on the fast forward's inputs), which
  gives every stale blob its value at once.

The layer-by-layer executor, the fast path and the engines all go through ``put`` (new
values), ``get``/``tensor`` (reads) and ``mark_stale``/``clear_stale``/``refresh``;
``Blob`` views read and write through the same calls. Nothing is kept on the Blob views or
on torch objects. The state also keeps each layer's last forward (``trace``), because a
fast forward makes those stale in the same stroke.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

from caffe_compat.formats.budget import check_shape

WHICH = ("data", "diff")


class _Arrays(dict):
    """A blob's host arrays by ``which``, all of ``shape``; one not yet made is made (zeros,
    as Caffe's fresh memory reads) on first use. An MTCNN pyramid's ``net.reshape()`` per
    scale zeroed every blob's data and diff, most never read: 56 ms of a 350 ms folder of
    photos. ``dict.get`` tells which exist without making any."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...], arrays: dict | None = None):
        super().__init__(arrays or {})
        self.shape = shape

    def __missing__(self, which: str) -> np.ndarray:
        array = self[which] = np.zeros(self.shape, np.float32)
        return array


class BlobState:
    """Per blob: the host arrays, the pending device tensors and whether it is stale."""

    def __init__(self):
        self._host: dict[str, _Arrays] = {}
        self._pending: dict[tuple[str, str], torch.Tensor] = {}
        self._stale: frozenset[str] = frozenset()
        self._recompute: Callable[[], None] | None = None
        self._traces: dict[int, object] = {}
        self.lazy = False       # leave results pending on the CPU too (the GPU path, tested)
        # bumped whenever a host array is replaced by a new one (add, reshape, a new shape):
        # an engine writing straight into output arrays binds them again when it changes
        self.arrays_replaced = 0

    def add(self, name: str, shape: Iterable[int]) -> None:
        """A new blob of ``shape``, zero data and diff on the host."""
        shape = tuple(int(d) for d in shape)
        self._host[name] = _Arrays(shape)
        self.arrays_replaced += 1

    # -- staleness ----------------------------------------------------------------------
    def mark_stale(self, names: frozenset[str], recompute: Callable[[], None]) -> None:
        """``names`` were not written by the last forward; ``recompute`` gives them (and
        every other blob) their values. Recorded layer forwards are dropped too."""
        self._traces.clear()
        self._stale = names
        self._recompute = recompute

    def clear_stale(self) -> None:
        """A full forward is about to overwrite every blob: nothing needs recomputing."""
        self._stale = frozenset()
        self._recompute = None

    def is_stale(self, name: str) -> bool:
        return name in self._stale

    def stale_names(self) -> frozenset[str]:
        return self._stale

    def refresh(self, name: str | None = None) -> None:
        """Recompute now if ``name`` (or, with no name, any blob) is stale."""
        recompute = self._recompute
        if recompute is None or (name is not None and name not in self._stale):
            return
        self.clear_stale()
        recompute()

    # -- values -------------------------------------------------------------------------
    def pending(self, name: str) -> set[str]:
        """Which of the blob's ``data``/``diff`` are pending on a device now."""
        return {w for w in WHICH if (name, w) in self._pending}

    def get(self, name: str, which: str = "data") -> np.ndarray:
        """The blob's host array, with its latest values (a stale blob is recomputed, a
        pending tensor copied in first)."""
        if name in self._stale:
            self.refresh(name)
        if self._pending:
            tensor = self._pending.pop((name, which), None)
            if tensor is not None:
                self._copy_in(name, tensor, which)
        return self._host[name][which]

    def written(self, names: Iterable[str]) -> None:
        """The engine wrote new values straight into these blobs' host data arrays (the
        arrays ``host_data`` gave): nothing pending may overwrite them on a read."""
        if self._pending:
            for name in names:
                self._pending.pop((name, "data"), None)

    def hold(self, names: Iterable[str]) -> dict:
        """The blobs' host arrays and data values now, for ``restore``."""
        return {n: (self.get(n).copy(), _Arrays(self._host[n].shape, self._host[n]))
                for n in names}

    def restore(self, held: dict) -> None:
        """Put back the arrays ``hold`` returned (the very arrays: a caller may hold them),
        holding the data values they had then."""
        for name, (data, arrays) in held.items():
            self._pending.pop((name, "data"), None)
            current = self._host[name]
            if current.keys() != arrays.keys() or current.shape != arrays.shape or \
                    any(current[w] is not a for w, a in arrays.items()):
                self._host[name] = arrays
                self.arrays_replaced += 1
            np.copyto(arrays["data"], data)

    def host_data(self, name: str) -> np.ndarray:
        """The blob's host data array itself, for an engine to write into (then
        ``written``); valid while ``arrays_replaced`` is unchanged."""
        return self._host[name]["data"]

    def put(self, name: str, tensor: torch.Tensor, which: str = "data",
            lazy: bool = False) -> None:
        """New values from the engine; ``lazy`` leaves them on their device until read."""
        if lazy:
            self._pending[(name, which)] = tensor.detach()
            return
        if self._pending:
            self._pending.pop((name, which), None)
        self._copy_in(name, tensor, which)

    def tensor(self, name: str, which: str, device: torch.device) -> torch.Tensor:
        """The values as a tensor on ``device``: the pending one if it lives there, else a
        copy of the host array (so later writes to the array do not alias it)."""
        pending = self._pending.get((name, which))
        if pending is not None and pending.device == device:
            return pending
        host = self.get(name, which)
        return torch.from_numpy(np.array(host, dtype=np.float32)).to(device)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._stale:
            self.refresh(name)
        pending = self._pending.get((name, "data"))
        return tuple(pending.shape) if pending is not None else self._host[name].shape

    def reshape(self, name: str, shape, allow_empty: bool = True, fresh: bool = False) -> None:
        """A new shape (values kept when the count is unchanged; zeros with ``fresh``).
        ResourceError naming the blob for a shape that is not whole numbers, has a negative
        (or, unless ``allow_empty``, zero) dim or more than 32 axes, or exceeds the memory
        budget."""
        shape = check_shape(shape, f"blob '{name}'" if name else "blob",
                            itemsize=8, allow_empty=allow_empty)  # data + diff, before numpy
        if name in self._stale:           # values kept below: stale or pending ones first
            self.refresh(name)
        for which in WHICH:
            if (name, which) in self._pending:
                self.get(name, which)
        arrays = self._host[name]
        if shape == arrays.shape and not fresh:
            return
        if math.prod(shape) == math.prod(arrays.shape) and not fresh:
            self._host[name] = _Arrays(shape, {w: a.reshape(shape) for w, a in arrays.items()})
        else:
            self._host[name] = _Arrays(shape)
        self.arrays_replaced += 1

    def _copy_in(self, name: str, tensor: torch.Tensor, which: str) -> None:
        arrays = self._host[name]
        current = arrays[which]
        if tensor.dtype == torch.float32 and tensor.device.type == "cpu" \
                and current.shape == tensor.shape:       # the common case: one copy
            np.copyto(current, (tensor.detach() if tensor.requires_grad else tensor).numpy())
            return
        value = tensor.detach().to("cpu", torch.float32).numpy()
        if current.shape == value.shape:
            np.copyto(current, value)
            return
        arrays[which] = value.copy()
        self.arrays_replaced += 1
        other = "diff" if which == "data" else "data"
        if arrays.shape != value.shape and (name, other) not in self._pending:
            arrays.pop(other, None)                # zeros of the new shape when first used
        arrays.shape = value.shape

    # -- each layer's last forward (kept for backward) ---------------------------------
    def trace(self, pos: int):
        return self._traces.get(pos)

    def record(self, pos: int, trace) -> None:
        self._traces[pos] = trace
