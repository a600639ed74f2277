"""pycaffe's ``caffe.Net``, ``Blob`` and ``Layer`` surface over a NetModule.

Blob values live in host numpy arrays (float32, writable) like Caffe's CPU memory; on the
CPU, parameter arrays are views of the parameter tensors, so writing ``net.params[l][0].data``
changes the model at once. On a GPU the host copies are pushed to the device before each
forward/backward and refreshed after it (Caffe's SyncedMemory, done per call).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable

import numpy as np
import torch

from caffe_compat.engine import mode, weights
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.engine.layers.base import TEST, TRAIN
from caffe_compat.engine.layers.python_trust import PythonLayerBase
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.proto import caffe_pb2


class Blob:
    """An activation blob: ``data`` and ``diff`` are float32 numpy arrays of one shape."""

    def __init__(self, shape: Iterable[int]):
        shape = tuple(int(d) for d in shape)
        self._data = np.zeros(shape, np.float32)
        self._diff = np.zeros(shape, np.float32)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value) -> None:
        self._data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @diff.setter
    def diff(self, value) -> None:
        self._diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def count(self) -> int:
        return int(self._data.size)

    def _legacy(self, i: int) -> int:
        shape = (1,) * (4 - len(self.shape)) + self.shape if len(self.shape) < 4 else self.shape
        return int(shape[i])

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape: int) -> None:
        """Give the blob a new shape (values are kept when the count is unchanged)."""
        shape = tuple(int(d) for d in (shape[0] if len(shape) == 1 and
                                       not isinstance(shape[0], int) else shape))
        if shape == self.shape:
            return
        if int(np.prod(shape)) == self.count:
            self._data = self._data.reshape(shape)
            self._diff = self._diff.reshape(shape)
        else:
            self._data = np.zeros(shape, np.float32)
            self._diff = np.zeros(shape, np.float32)

    def _store(self, tensor: torch.Tensor, which: str = "_data") -> None:
        value = tensor.detach().to("cpu", torch.float32).numpy()
        current = getattr(self, which)
        if current.shape != value.shape:
            other = "_diff" if which == "_data" else "_data"
            setattr(self, which, value.copy())
            if getattr(self, other).shape != value.shape:
                setattr(self, other, np.zeros(value.shape, np.float32))
        else:
            np.copyto(current, value)

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


class ParamBlob:
    """A parameter blob; ``data``/``diff`` are views of the parameter tensor and its grad."""

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self._host: dict[str, np.ndarray] = {}     # host mirrors when the param is not on CPU

    def _view(self, which: str) -> np.ndarray:
        p = self.param
        if which == "diff" and p.grad is None:
            p.grad = torch.zeros_like(p)
        t = p.data if which == "data" else p.grad
        if t.device.type == "cpu" and t.dtype == torch.float32:
            return t.numpy()
        host = self._host.get(which)
        if host is None or host.shape != tuple(t.shape):
            host = np.empty(tuple(t.shape), np.float32)
            self._host[which] = host
        np.copyto(host, t.detach().to("cpu", torch.float32).numpy())
        return host

    def _push(self) -> None:
        """Copy host mirrors (GPU mode) back to the device tensors."""
        for which, host in self._host.items():
            t = self.param.data if which == "data" else self.param.grad
            if t is not None:
                t.copy_(torch.from_numpy(host))
        self._host.clear()

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
    def blobs(self) -> list[ParamBlob]:
        return [ParamBlob(p) for p in self.layer.blobs]

    def __repr__(self) -> str:
        return f"<{self.type} layer '{self.name}'>"


def _phase_value(value) -> int:
    if value in (TRAIN, TEST):
        return int(value)
    raise ValueError(f"phase must be caffe.TRAIN (0) or caffe.TEST (1), got {value!r}")


def read_net_prototxt(path: str) -> caffe_pb2.NetParameter:
    """Parse a network prototxt (file path); errors name file:line:col."""
    return read_text_proto(os.fspath(path), caffe_pb2.NetParameter)


class Net:
    """``caffe.Net(prototxt, phase)``, ``caffe.Net(prototxt, weights, phase)`` or keywords."""

    def __init__(self, network_file, *args, phase=None, weights=None, level: int = 0,
                 stages=None, net_param: caffe_pb2.NetParameter | None = None,
                 allow_python_layers: bool | None = None):
        if len(args) == 1:
            phase = args[0] if phase is None else phase
        elif len(args) == 2:
            weights, phase = args
        elif len(args) > 2:
            raise TypeError("Net(prototxt, [weights,] phase): too many arguments")
        if phase is None:
            raise TypeError("Net needs a phase: caffe.Net(prototxt, caffe.TEST)")
        source = os.fspath(network_file) if network_file is not None else "<net_param>"
        param = net_param if net_param is not None else read_net_prototxt(source)
        module = build_net(param, _phase_value(phase), level, stages or (), source=source,
                           allow_python_layers=allow_python_layers)
        self._init_from_module(module.to(mode.device()))
        if weights:
            self.copy_from(weights)

    @classmethod
    def from_module(cls, module: NetModule) -> "Net":
        net = cls.__new__(cls)
        net._init_from_module(module)
        return net

    def _init_from_module(self, module: NetModule) -> None:
        self.module = module
        self.blobs: "OrderedDict[str, Blob]" = OrderedDict(
            (name, Blob(shape)) for name, shape in module.blob_shapes.items())
        for name, w in module.loss_weights.items():
            self.blobs[name].diff[...] = w        # Caffe seeds loss tops' diffs at setup
        self._graph: dict[str, torch.Tensor] = {}
        self._first: dict[str, torch.Tensor] = {}

    # -- pycaffe attributes -----------------------------------------------------------
    @property
    def params(self) -> "OrderedDict[str, list[ParamBlob]]":
        return OrderedDict((name, [ParamBlob(p) for p in layer.blobs])
                           for name, layer in self.module.named_layers() if len(layer.blobs))

    @property
    def layers(self) -> list[LayerView]:
        return [LayerView(n, l) for n, l in self.module.named_layers()]

    @property
    def inputs(self) -> list[str]:
        return list(self.module.input_names)

    @property
    def outputs(self) -> list[str]:
        return list(self.module.output_names)

    @property
    def top_names(self) -> "OrderedDict[str, list[str]]":
        return OrderedDict((n, list(self.module.top_names[n])) for n in self.module.layer_names)

    @property
    def bottom_names(self) -> "OrderedDict[str, list[str]]":
        return OrderedDict((n, list(self.module.bottom_names[n])) for n in self.module.layer_names)

    @property
    def _layer_names(self) -> list[str]:
        return list(self.module.layer_names)

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    @property
    def phase(self) -> int:
        return self.module.phase

    # -- running ----------------------------------------------------------------------
    def _device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return mode.device()

    def _push_params(self) -> None:
        if self._device().type != "cpu":
            for layer in self.module.layers:
                for p in layer.blobs:
                    ParamBlob(p)._push()

    def forward(self, blobs=None, start=None, end=None, **kwargs) -> dict[str, np.ndarray]:
        """Run the net (optionally layers ``start``..``end``); returns the output blobs' data."""
        for name, value in kwargs.items():
            if name not in self.blobs:
                raise KeyError(f"forward(): '{name}' is not a blob of this net")
            value = np.asarray(value)
            if value.shape != self.blobs[name].shape:
                raise ValueError(f"forward(): input '{name}' has shape {value.shape}, the blob "
                                 f"has {self.blobs[name].shape}; call blob.reshape first")
            self.blobs[name].data[...] = value
        m = self.module
        start_i = m.layer_index(start) if start is not None else 0
        end_i = m.layer_index(end) if end is not None else len(m.layers) - 1
        self._push_params()
        dev = self._device()
        grad = bool(m.net_param.force_backward)
        inputs = {}
        for name in m.input_names:
            t = torch.from_numpy(self.blobs[name].data.copy()).to(dev)
            inputs[name] = t.requires_grad_(grad)
        seed = {}
        if start_i > 0:
            for name, blob in self.blobs.items():
                t = torch.from_numpy(blob.data.copy()).to(dev)
                seed[name] = t.requires_grad_(grad)
        first: dict[str, torch.Tensor] = dict(seed)
        first.update(inputs)
        result = m.run(inputs, start_i, end_i, blobs=dict(seed), keep_all=True, record=first)
        for name, t in result.items():
            if name in self.blobs:
                self.blobs[name]._store(t)
        for t in first.values():
            if t.requires_grad and not t.is_leaf:
                t.retain_grad()
        self._graph, self._first = result, first
        out_names = list(m.top_names[m.layer_names[end_i]]) if end is not None else self.outputs
        out_names += [b for b in (blobs or []) if b not in out_names]
        return {name: self.blobs[name].data for name in out_names}

    def backward(self, diffs=None, start=None, end=None, **kwargs) -> dict[str, np.ndarray]:
        """Backpropagate from the output blobs' diffs (loss tops start at their loss_weight).

        Parameter diffs accumulate over calls, as in Caffe, until ``clear_param_diffs``.
        """
        if not self._graph:
            raise RuntimeError("backward() needs a forward() first")
        for name, value in kwargs.items():
            if name not in self.outputs:
                raise KeyError(f"backward(): '{name}' is not an output blob of this net")
            self.blobs[name].diff[...] = value
        dev = self._device()
        seeds = list(self.outputs) + [n for n in self.module.loss_weights if n not in self.outputs]
        tensors, grads = [], []
        for name in seeds:
            t = self._graph.get(name)
            if t is not None and t.requires_grad:
                tensors.append(t)
                grads.append(torch.from_numpy(self.blobs[name].diff.copy()).to(dev).reshape(t.shape))
        for t in self._first.values():
            if t.requires_grad:
                t.grad = None
        self._push_params()
        if tensors:
            torch.autograd.backward(tensors, grads, retain_graph=True)
        for name, t in self._first.items():
            if t.grad is not None and name in self.blobs:
                self.blobs[name]._store(t.grad, "_diff")
        names = list(self.inputs) + [d for d in (diffs or []) if d not in self.inputs]
        return {name: self.blobs[name].diff for name in names}

    def clear_param_diffs(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def reshape(self) -> None:
        """Propagate the Input blobs' current shapes through the net (Caffe's Net::Reshape)."""
        shapes = self.module.infer_shapes({n: self.blobs[n].shape for n in self.inputs})
        for name, shape in shapes.items():
            self.blobs[name].reshape(*shape)

    # -- weights ----------------------------------------------------------------------
    def copy_from(self, path) -> None:
        weights.copy_from(self.module, os.fspath(path))

    def save(self, path) -> None:
        weights.save(self.module, os.fspath(path))

    def save_hdf5(self, path) -> None:
        weights.save_h5(self.module, os.fspath(path))

    def load_hdf5(self, path) -> None:
        weights.copy_from(self.module, os.fspath(path))

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s parameter storage for every layer of the same name (no copy)."""
        self.module.share_trained_layers_with(other.module)

    def __repr__(self) -> str:
        return f"<caffe_compat.Net '{self.module.name}' phase={'TRAIN' if self.phase == 0 else 'TEST'}>"


class PythonLayer(PythonLayerBase):
    """pycaffe's ``caffe.Layer``: the base class of user layers for ``type: "Python"``.

    Subclasses define ``setup``, ``reshape``, ``forward(bottom, top)`` and optionally
    ``backward(top, propagate_down, bottom)`` on blob lists, exactly as in Caffe. The
    ``Python`` layer sets ``param_str`` and ``phase`` before calling ``setup``.
    """

    def __init__(self, param: caffe_pb2.LayerParameter | None = None):
        self.layer_param = param
        self.param_str = param.python_param.param_str if param is not None else ""
        self.blobs: list = []

    def setup(self, bottom, top) -> None:
        pass

    def reshape(self, bottom, top) -> None:
        pass

    def forward(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no forward()")

    def backward(self, top, propagate_down, bottom) -> None:
        pass
