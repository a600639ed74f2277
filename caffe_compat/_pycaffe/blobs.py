"""Blob views for the pycaffe surface: activation ``Blob``s, parameter ``ParamBlob``s and
``net.layers[i]`` (``LayerView``).

Activation blobs are views of their Net's ``BlobState`` (host float32 arrays, writable, like
Caffe's CPU memory; pending device tensors; stale blobs). On the
CPU, parameter arrays are views of the parameter tensors, so writing
``net.params[l][0].data`` changes the model at once; on a GPU the host copies are pushed to
the device before each forward/backward (Caffe's SyncedMemory, done per call).
"""
from __future__ import annotations

import weakref
from typing import Iterable

import numpy as np
import torch

from caffe_compat._pycaffe.param_views import note_numpy_view
from caffe_compat._pycaffe.state import BlobState
from caffe_compat.engine.layers.blob_vectors import BlobVec
from caffe_compat.formats.budget import check_shape


class Blob:
    """An activation blob: ``data`` and ``diff`` are float32 numpy arrays of one shape.

    A view of one entry of its Net's ``BlobState`` (``_pycaffe/state.py``), which knows where
    the current values live (host array, pending device tensor, stale until recomputed):
    the arrays are stable (one per blob until its shape changes, refreshed in place), and on
    a GPU new values are copied to the host only when ``data``/``diff`` is read, as Caffe's
    SyncedMemory does. A Blob made on its own gets a state of its own.
    """

    def __init__(self, shape: Iterable[int], name: str = "", state: BlobState | None = None):
        self.name = name                # for messages: "blob 'data'"
        self._state = state if state is not None else BlobState()
        self._state.add(name, shape)

    @property
    def data(self) -> np.ndarray:
        return self._state.get(self.name, "data")

    @data.setter
    def data(self, value) -> None:
        self._state.get(self.name, "data")[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._state.get(self.name, "diff")

    @diff.setter
    def diff(self, value) -> None:
        self._state.get(self.name, "diff")[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return self._state.shape(self.name)

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
        dim or more than 32 axes, or exceeds the memory budget. Zero dims are allowed, as in
        Caffe (py-faster-rcnn reshapes its rois to an image with no proposals)."""
        if len(shape) == 1 and isinstance(shape[0], Iterable) and not isinstance(shape[0], str):
            shape = tuple(shape[0])
        self._state.reshape(self.name, shape, allow_empty=True)

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

    def __init__(self, param: torch.nn.Parameter, where: str = "parameter blob"):
        self.param = param
        self.where = where             # for messages: "layer 'conv1' param 0"

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
        """Give the parameter a new shape, as Caffe's Blob::Reshape does for net surgery that
        writes new values and saves them (a channel added to a BatchNorm, a layer recoded):
        a count no larger keeps the first values in the new shape, a larger one starts at
        zero (Caffe's reallocation); the diff starts at zero.
        The layer's definition is not changed: ``net.save`` writes the new shape, a forward
        the layer cannot run with it fails. ResourceError naming the layer's blob for a
        shape that is not whole numbers, has a negative dim or exceeds the memory budget."""
        if len(shape) == 1 and isinstance(shape[0], Iterable) and not isinstance(shape[0], str):
            shape = tuple(shape[0])
        p = self.param
        dims = check_shape(shape, self.where, itemsize=8)
        flush_host_mirrors()           # edits made through a host mirror first reach p
        if dims == tuple(p.shape):
            return
        _RESHAPED.setdefault(id(p), (weakref.ref(p, lambda _, k=id(p): _RESHAPED.pop(k, None)),
                                     self.where, tuple(p.shape)))      # the built shape
        count = int(np.prod(dims))
        with torch.no_grad():
            # Caffe reallocates (zeroed memory) only when the count grows past the blob's
            # capacity; otherwise the buffer, read in the new shape, keeps its first values
            new = p.detach().reshape(-1)[:count].clone().reshape(dims) if count <= p.numel() \
                else torch.zeros(dims, dtype=p.dtype, device=p.device)
            p.set_(new)                # in place: the layer keeps p and p._version moves,
        p.grad = None                  # so a cached fused net is rebuilt

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
    return BlobVec(layer.blobs,
                   lambda params, i: ParamBlob(params[i], f"layer '{layer.name}' param {i}"))


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


# Parameters ParamBlob.reshape gave a new shape: id -> (weak reference, "layer 'x' param i",
# the shape the layer was built with), for the error of a forward that cannot use them.
_RESHAPED: dict[int, tuple] = {}


def surgery_error(module) -> str | None:
    """Why a forward failed when a parameter of ``module`` was reshaped away from the shape
    its layer was built with (net surgery meant for ``net.save``); None when none was."""
    for layer in module.layers:
        for p in layer.blobs:
            entry = _RESHAPED.get(id(p))
            if entry is not None and entry[0]() is p and tuple(p.shape) != entry[2]:
                return (f"{entry[1]} was reshaped from {list(entry[2])} to {list(p.shape)} and "
                        "the layer cannot run with it: save the weights (net.save) and load "
                        "them into a net defined with that shape")
    return None
