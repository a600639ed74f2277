"""The Python layer: a user class from ``python_param { module layer param_str }``.

As in Caffe, the module is imported, the class instantiated, ``param_str`` and ``phase``
set on the object, then ``setup(bottom, top)`` and ``reshape(bottom, top)`` run once at
construction. Each forward calls ``reshape`` then ``forward(bottom, top)``; backward calls
``backward(top, propagate_down, bottom)``. The blobs handed to the user code are
``_PyBlob``s holding numpy arrays (float32, or float64 when the layer runs in double).

Exceptions raised by the user code reach the caller unchanged (same type and message, as
from pycaffe); a note naming the layer and the step is attached where Python supports it.
The user object's ``self.blobs`` is a ``BlobVec`` over this layer's parameter blobs, so
``self.blobs.add_blob(*shape)`` makes a learnable blob that caffemodels save and load.
``param_str`` is also set as ``param_str_`` and ``phase`` prints as 'TRAIN'/'TEST', the
spellings caffe-fast-rcnn's layers (py-faster-rcnn) use.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.blob_vectors import BlobVec, BoolVec, Phase, RawBlobVec
from caffe_compat.engine.layers.common import pack
from caffe_compat.engine.layers.python_trust import not_a_layer_class, refusal, unimportable


class _PyBlob:
    """The minimal pycaffe Blob a Python layer sees: ``data``/``diff`` arrays, shape, reshape."""

    def __init__(self, shape: Sequence[int] = (), dtype=np.float32):
        self._dtype = np.dtype(dtype)
        self._alloc(tuple(int(s) for s in shape))

    def _alloc(self, shape: Shape) -> None:
        self._data = np.zeros(shape, dtype=self._dtype)
        self._diff = np.zeros(shape, dtype=self._dtype)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(self._data.size)

    def _legacy(self, i: int) -> int:
        # Caffe's LegacyShape: missing axes read as 1.
        return self._data.shape[i] if i < self._data.ndim else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape: int) -> None:
        """New shape; contents are kept only when the shape is unchanged."""
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"blob dims must be non-negative, got {list(shape)}")
        if shape != self.shape:
            self._alloc(shape)

    def _set_dtype(self, dtype) -> None:
        if np.dtype(dtype) != self._dtype:
            self._dtype = np.dtype(dtype)
            self._data = self._data.astype(self._dtype)
            self._diff = self._diff.astype(self._dtype)

    def _set_data(self, values: np.ndarray) -> None:
        self.reshape(*values.shape)
        self._data[...] = values

    def __repr__(self) -> str:
        return f"_PyBlob(shape={list(self.shape)})"


class _ParamView:
    """``self.blobs[i]`` of a user layer: numpy views of the engine's parameter ``i``.

    It reads ``owner[i]`` on every access, so a parameter replaced by sharing
    (``Net.share_with``) is seen at once.
    """

    def __init__(self, owner: torch.nn.ParameterList, index: int):
        self._owner, self._index = owner, index

    def _param(self) -> torch.nn.Parameter:
        return self._owner[self._index]

    @property
    def data(self) -> np.ndarray:
        return self._param().data.numpy()

    @property
    def diff(self) -> np.ndarray:
        p = self._param()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad.numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._param().shape)

    @property
    def count(self) -> int:
        return self._param().numel()

    def reshape(self, *shape: int) -> None:
        shape = tuple(int(s) for s in shape)
        if shape != self.shape:
            self._owner[self._index] = torch.nn.Parameter(torch.zeros(shape))

    def __repr__(self) -> str:
        return f"_ParamView(shape={list(self.shape)})"


class _PythonFunction(torch.autograd.Function):
    """Runs the user's forward in numpy, and its backward (if any) for the gradient."""

    @staticmethod
    def forward(ctx, layer: "Python", *bottoms: torch.Tensor):
        tops = layer._run_forward(bottoms)
        ctx.layer = layer
        ctx.save_for_backward(*bottoms, *tops)
        ctx.num_bottoms = len(bottoms)
        return tuple(tops)

    @staticmethod
    def backward(ctx, *top_grads: torch.Tensor):
        saved = ctx.saved_tensors
        bottoms, tops = saved[:ctx.num_bottoms], saved[ctx.num_bottoms:]
        need = list(ctx.needs_input_grad[1:])
        grads = ctx.layer._run_backward(bottoms, tops, top_grads, need)
        return (None, *[g if n else None for g, n in zip(grads, need)])


def _import(layer: Layer, module_name: str, layer_name: str):
    # Caffe's embedded interpreter also finds modules in the current directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    refused = unimportable(module_name, layer_name)    # checked before any code runs
    if refused:
        raise layer.error(refused)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise layer.error(f"cannot import python_param.module '{module_name}': {exc}. "
                          + _import_advice(exc)) from exc


def _import_advice(exc: ImportError) -> str:
    # Forks ship layers inside their own pycaffe package, and a PYTHONPATH entry cannot add
    # to ours. caffe.layers.detectnet (NVIDIA/caffe's, for DIGITS) is answered by
    # caffe_compat.detectnet; other "caffe.*" modules are not.
    if (exc.name or "").startswith("caffe."):
        return (f"'{exc.name}' is part of another Caffe's own python/caffe package, which "
                "caffe-compat's caffe does not ship: copy that layer's file next to the "
                "prototxt and name it in python_param.module")
    return "Put its folder on PYTHONPATH or run from that folder"


def _instantiate(cls, param):
    """Create the user object; Caffe passes the LayerParameter, plain classes take nothing."""
    try:
        inspect.signature(cls).bind(param)
    except TypeError:
        return cls()
    except ValueError:  # no signature available (builtin base): pass the param like Caffe
        pass
    return cls(param)


@register
class Python(Layer):
    """A layer implemented by user Python code (see the module docstring).

    A user class without ``backward`` gives zero gradients. Blobs the user adds with
    ``self.blobs.add_blob`` are this layer's parameter blobs; the user's ``backward`` writes
    their diffs directly, as in Caffe.
    """

    type = "Python"
    exports_to_onnx = False
    traceable = False
    num_bottoms = (0, None)
    num_tops = (0, None)
    runs_user_code = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.python_param
        if not p.module or not p.layer:
            raise self.error("python_param needs both 'module' and 'layer'")
        if refusal(p.module):                                   # trust model: python_trust
            raise self.error(refusal(p.module))
        module = _import(self, p.module, p.layer)
        cls = getattr(module, p.layer, None)
        if cls is None:
            raise self.error(f"module '{p.module}' has no class '{p.layer}'")
        if not_a_layer_class(p.module, p.layer, cls):           # never call a mere callable
            raise self.error(not_a_layer_class(p.module, p.layer, cls))
        self.py = self._call(lambda: _instantiate(cls, param), "creating the layer")
        self.py.param_str = p.param_str
        self.py.param_str_ = p.param_str           # caffe-fast-rcnn's spelling
        self.py.phase = Phase(phase)                 # int; str() 'TRAIN'/'TEST'
        self.py.blobs = BlobVec(self.blobs, _ParamView)
        self.num_outputs = len(param.top)
        self._bottoms = RawBlobVec(_PyBlob(s) for s in bottom_shapes)
        self._tops = RawBlobVec(_PyBlob() for _ in range(self.num_outputs))
        self._call(lambda: self.py.setup(self._bottoms, self._tops), "setup")
        self._call(lambda: self.py.reshape(self._bottoms, self._tops), "reshape")
        self._init_shapes = ([tuple(s) for s in bottom_shapes], [b.shape for b in self._tops])
        # Tracks the module's device and dtype for layers without bottoms (Python data layers).
        self.register_buffer("_like", torch.zeros(0), persistent=False)

    def _call(self, fn, what: str):
        try:
            return fn()
        except Exception as exc:  # unchanged for the caller, as pycaffe; a note names the layer
            exc.caffe_python_layer = self.name
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised in {what} of Python layer '{self.name}')")
            raise

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shapes = [tuple(s) for s in bottom_shapes]
        if shapes == self._init_shapes[0]:
            return list(self._init_shapes[1])
        bottoms = RawBlobVec(_PyBlob(s) for s in shapes)
        tops = RawBlobVec(_PyBlob(t.shape) for t in self._tops)
        self._call(lambda: self.py.reshape(bottoms, tops), "reshape")
        return [t.shape for t in tops]

    def forward(self, *bottoms: torch.Tensor):
        if self.num_outputs and torch.is_grad_enabled() and any(b.requires_grad for b in bottoms):
            tops = _PythonFunction.apply(self, *bottoms)
        else:
            tops = self._run_forward(bottoms)
        return pack(tops) if tops else ()

    # -- the numpy side ---------------------------------------------------------------
    def _dtype(self, bottoms: Sequence[torch.Tensor]):
        like = bottoms[0] if bottoms else self._like
        return np.float64 if like.dtype == torch.float64 else np.float32

    def _load(self, blobs: list[_PyBlob], tensors: Sequence[torch.Tensor], dtype) -> None:
        for blob, t in zip(blobs, tensors):
            blob._set_dtype(dtype)
            blob._set_data(t.detach().cpu().numpy())

    def _run_forward(self, bottoms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        dtype = self._dtype(bottoms)
        self._load(self._bottoms, bottoms, dtype)
        for t in self._tops:
            t._set_dtype(dtype)
        self._call(lambda: self.py.reshape(self._bottoms, self._tops), "reshape")
        self._call(lambda: self.py.forward(self._bottoms, self._tops), "forward")
        like = bottoms[0] if bottoms else self._like
        return [torch.from_numpy(np.array(t.data, dtype=dtype)).to(like.device) for t in self._tops]

    def _run_backward(self, bottoms, tops, top_grads, need: list[bool]) -> list[torch.Tensor]:
        if not hasattr(self.py, "backward"):
            return [torch.zeros_like(b) for b in bottoms]
        dtype = self._dtype(bottoms)
        # Restore this forward's values: another forward may have run since.
        self._load(self._bottoms, bottoms, dtype)
        self._load(self._tops, tops, dtype)
        for blob, g in zip(self._tops, top_grads):
            blob._diff[...] = 0 if g is None else g.detach().cpu().numpy()
        for blob in self._bottoms:
            blob._diff[...] = 0
        self._call(lambda: self.py.backward(self._tops, BoolVec(need), self._bottoms), "backward")
        return [torch.from_numpy(np.array(blob.diff, dtype=dtype)).to(b.device).reshape(b.shape)
                for blob, b in zip(self._bottoms, bottoms)]
