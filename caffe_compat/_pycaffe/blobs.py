"""Blob views for the pycaffe surface: activation ``Blob``s, parameter ``ParamBlob``s and
``net.layers[i]`` (``LayerView``).

Activation blobs hold host numpy arrays (float32, writable) like Caffe's CPU memory. On the
CPU, parameter arrays are views of the parameter tensors, so writing
``net.params[l][0].data`` changes the model at once; on a GPU the host copies are pushed to
the device before each forward/backward (Caffe's SyncedMemory, done per call).
"""
from __future__ import annotations

import weakref
from typing import Iterable

import numpy as np
import torch

from caffe_compat._pycaffe.fast import note_numpy_view
from caffe_compat.engine.layers.blob_vectors import BlobVec
from caffe_compat.formats.budget import check_shape


class Blob:
    """An activation blob: ``data`` and ``diff`` are float32 numpy arrays of one shape.

    The arrays are stable: one array per blob (until its shape changes), refreshed in place.
    On the CPU each forward/backward copies the new values in at once, as Caffe's CPU
    memory would hold them. On a GPU the new values stay on the device (``_pending``) and
    are copied to the host array only when ``data``/``diff`` is read, as Caffe's
    SyncedMemory does (an array fetched earlier sees them after the next read), and a
    later layer reading the blob takes the device tensor directly: no host round trip.
    """

    def __init__(self, shape: Iterable[int], name: str = ""):
        shape = tuple(int(d) for d in shape)
        self.name = name                # for messages: "blob 'data'"
        self._data = np.zeros(shape, np.float32)
        self._diff = np.zeros(shape, np.float32)
        self._pending: dict[str, torch.Tensor] = {}
        self._refresh = None      # set while the net's fast forward left this blob stale

    def _synced(self, which: str) -> np.ndarray:
        if self._refresh is not None:
            self._refresh()
        tensor = self._pending.pop(which, None)
        if tensor is not None:
            self._store_now(tensor, which)
        return getattr(self, which)

    @property
    def data(self) -> np.ndarray:
        return self._synced("_data")

    @data.setter
    def data(self, value) -> None:
        self._synced("_data")[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._synced("_diff")

    @diff.setter
    def diff(self, value) -> None:
        self._synced("_diff")[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        if self._refresh is not None:
            self._refresh()
        pending = self._pending.get("_data")
        return tuple(pending.shape) if pending is not None else self._data.shape

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _legacy(self, i: int) -> int:
        # Caffe's LegacyShape: axes past the blob's own read as 1 ((N, C) is N x C x 1 x 1)
        return int(self.shape[i]) if i < len(self.shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape: int) -> None:
        """Give the blob a new shape (values are kept when the count is unchanged).

        ResourceError naming the blob for a shape that is not whole numbers, has a negative
        or zero dim or more than 32 axes, or exceeds the memory budget."""
        if len(shape) == 1 and isinstance(shape[0], Iterable) and not isinstance(shape[0], str):
            shape = tuple(shape[0])
        self._reshape(shape, allow_empty=False)

    def _reshape(self, shape, allow_empty: bool = True) -> None:
        """``reshape`` for the net's own shape pass (a layer may produce an empty top)."""
        shape = check_shape(shape, f"blob '{self.name}'" if self.name else "blob",
                            itemsize=8, allow_empty=allow_empty)  # data + diff, before numpy
        self._synced("_data"), self._synced("_diff")
        if shape == self.shape:
            return
        if int(np.prod(shape)) == self.count:
            self._data = self._data.reshape(shape)
            self._diff = self._diff.reshape(shape)
        else:
            self._data = np.zeros(shape, np.float32)
            self._diff = np.zeros(shape, np.float32)

    def _store(self, tensor: torch.Tensor, which: str = "_data", lazy: bool = False) -> None:
        """New values from the engine; ``lazy`` keeps them on their device until read."""
        if lazy:
            self._pending[which] = tensor.detach()
        else:
            self._pending.pop(which, None)
            self._store_now(tensor, which)

    def _tensor(self, which: str, device: torch.device) -> torch.Tensor:
        """The values as a tensor on ``device``: the pending one if it lives there, else a
        copy of the host array (so later writes to the array do not alias it)."""
        pending = self._pending.get(which)
        if pending is not None and pending.device == device:
            return pending
        host = self._synced(which)
        return torch.from_numpy(np.array(host, dtype=np.float32)).to(device)

    def _store_now(self, tensor: torch.Tensor, which: str) -> None:
        value = tensor.detach().to("cpu", torch.float32).numpy()
        current = getattr(self, which)
        if current.shape != value.shape:
            other = "_diff" if which == "_data" else "_data"
            setattr(self, which, value.copy())
            if getattr(self, other).shape != value.shape and other not in self._pending:
                setattr(self, other, np.zeros(value.shape, np.float32))
        else:
            np.copyto(current, value)

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


class ParamBlob:
    """A parameter blob; ``data``/``diff`` are views of the parameter tensor and its grad.

    A float32 CPU parameter is viewed directly. Any other (a GPU or a double parameter) gets
    a float32 host mirror kept on the parameter itself (``_caffe_host``), so every ParamBlob
    of it -- ``net.params[name][i]`` makes a new one per access -- sees the same array and
    the user's writes (FCN's surgery, merge-BN scripts) survive until ``flush_host_mirrors``
    copies the edited ones to the device, as Caffe's SyncedMemory does before device use.
    """

    def __init__(self, param: torch.nn.Parameter):
        self.param = param

    def _view(self, which: str) -> np.ndarray:
        p = self.param
        if which == "diff" and p.grad is None:
            p.grad = torch.zeros_like(p)
        t = p.data if which == "data" else p.grad
        if t.device.type == "cpu" and t.dtype == torch.float32:
            view = t.numpy()
            if which == "data":        # writes through it bypass torch's version counter
                note_numpy_view(p, view)
            return view
        mirrors = p.__dict__.setdefault("_caffe_host", {})
        _MIRRORED[id(p)] = weakref.ref(p)
        entry = mirrors.get(which)
        if entry is None or entry[0].shape != tuple(t.shape):
            host = t.detach().to("cpu", torch.float32).numpy().copy()
            entry = mirrors[which] = (host, host.copy())   # (mirror, as read: finds edits)
        return entry[0]

    @property
    def data(self) -> np.ndarray:
        return self._view("data")

    @data.setter
    def data(self, value) -> None:
        self._view("data")[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._view("diff")

    @diff.setter
    def diff(self, value) -> None:
        self._view("diff")[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def count(self) -> int:
        return self.param.numel()

    num = property(lambda self: Blob._legacy(self, 0))
    channels = property(lambda self: Blob._legacy(self, 1))
    height = property(lambda self: Blob._legacy(self, 2))
    width = property(lambda self: Blob._legacy(self, 3))

    def reshape(self, *shape: int) -> None:
        raise ValueError("parameter blobs cannot be reshaped; edit the layer definition")

    def __repr__(self) -> str:
        return f"ParamBlob(shape={self.shape})"


class LayerView:
    """``net.layers[i]``: the layer's ``type``, ``name`` and parameter ``blobs``."""

    def __init__(self, name: str, layer):
        self.name = name
        self.layer = layer
        self.type = layer.type

    @property
    def blobs(self) -> BlobVec:
        return param_blobs(self.layer)

    def __getattr__(self, name: str):
        # pycaffe's net.layers[i] of a Python layer IS the user's object: py-faster-rcnn calls
        # solver.net.layers[0].set_roidb(roidb) on its data layer
        user = self.__dict__["layer"].__dict__.get("py")
        if user is not None and not name.startswith("__"):
            return getattr(user, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __repr__(self) -> str:
        return f"<{self.type} layer '{self.name}'>"


def param_blobs(layer) -> BlobVec:
    """``layer``'s parameter blobs as pycaffe's BlobVec of ParamBlob views."""
    return BlobVec(layer.blobs, lambda params, i: ParamBlob(params[i]))


# Parameters that hold host mirrors now (id -> weak reference): flushing is free when none do.
_MIRRORED: dict[int, weakref.ref] = {}


def flush_host_mirrors() -> None:
    """Copy the host mirrors the user edited to their parameters' tensors; drop every mirror
    (the next read copies the device values again). Run before the engine reads or changes
    parameters: forward, backward, solver steps, saving, loading."""
    while _MIRRORED:
        p = _MIRRORED.popitem()[1]()
        if p is None:
            continue
        mirrors = p.__dict__.pop("_caffe_host", None)
        for which, (host, as_read) in (mirrors or {}).items():
            t = p if which == "data" else p.grad    # the parameter itself: its _version moves,
            if t is not None and not np.array_equal(host, as_read, equal_nan=True):
                with torch.no_grad():                # so a cached fused net is rebuilt
                    t.copy_(torch.from_numpy(host).to(t.device, t.dtype))
