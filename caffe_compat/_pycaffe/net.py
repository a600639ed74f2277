"""pycaffe's ``caffe.Net`` and ``caffe.Layer`` over a NetModule.

Blobs are in ``caffe_compat._pycaffe.blobs``; forward/backward run layer by layer
(``caffe_compat._pycaffe.layerwise``) so that ``start``/``end``, hand-set data and diffs, and
backward before forward behave as in Caffe. ``forward_all``/``forward_backward_all`` batch
arbitrary-length inputs with pycaffe's padding rule.
"""
from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from itertools import zip_longest

import numpy as np
import torch

from caffe_compat._pycaffe.blobs import (Blob, LayerView, flush_host_mirrors, param_blobs,
                                         surgery_error)
from caffe_compat._pycaffe.layerwise import backward_plan, backward_range, forward_range
from caffe_compat._pycaffe.fast import FastForward, eligible
from caffe_compat._pycaffe.callbacks import CALLBACK_TIMES, LayerCallbacks
from caffe_compat._pycaffe.index_api import IndexAPI
from caffe_compat._pycaffe.state import BlobState
from caffe_compat.engine import mode, weights
from caffe_compat.engine.backends.engine import requested_engine
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.formats.errors import with_context
from caffe_compat.engine.layers.base import TEST, TRAIN, LayerError
from caffe_compat.engine.layers.blob_vectors import BlobVec, IntVec, LayerVec, StringVec
from caffe_compat.engine.layers.python_trust import PythonLayerBase
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.proto import caffe_pb2


log = logging.getLogger(__name__)


def _phase_value(value) -> int:
    if value in (TRAIN, TEST):
        return int(value)
    raise ValueError(f"phase must be caffe.TRAIN (0) or caffe.TEST (1), got {value!r}")


def read_net_prototxt(path: str) -> caffe_pb2.NetParameter:
    """Parse a network prototxt (file path); errors name file:line:col."""
    return read_text_proto(os.fspath(path), caffe_pb2.NetParameter)


class Net(IndexAPI, LayerCallbacks):
    """``caffe.Net(prototxt, phase)``, ``caffe.Net(prototxt, weights, phase)`` or keywords."""

    def __init__(self, network_file, *args, phase=None, weights=None, level: int = 0,
                 stages=None, net_param: caffe_pb2.NetParameter | None = None,
                 allow_python_layers: bool | None = None, engine: str | None = None,
                 precision: str = "fp32"):
        if args and (isinstance(args[0], (str, bytes, os.PathLike))   # legacy form
                     or (args[0] is None and len(args) == 2)):         # (no weights)
            if len(args) != 2:
                raise TypeError("Net(prototxt, weights, phase): give the phase too")
            weights, phase = args
        elif args:     # _caffe.cpp's (network_file, phase, level=0, stages=None, weights=None)
            if len(args) > 4:
                raise TypeError("Net(prototxt, phase, level, stages, weights): too many "
                                "arguments")
            phase, level, stages, weights = (tuple(args) + (phase, level, stages, weights)
                                             [len(args):])
        if phase is None:
            raise TypeError("Net needs a phase: caffe.Net(prototxt, caffe.TEST)")
        source = os.fspath(network_file) if network_file is not None else "<net_param>"
        param = net_param if net_param is not None else read_net_prototxt(source)
        module = build_net(param, _phase_value(phase), level, stages or (), source=source,
                           allow_python_layers=allow_python_layers)
        self._init_from_module(module.to(mode.device()))
        if weights:
            self.copy_from(weights)
        self._choose_engine(engine, precision)

    def _choose_engine(self, engine: str | None, precision: str = "fp32") -> None:
        """``engine`` (or $CAFFE_COMPAT_ENGINE): torch, onnxruntime, openvino or auto for the
        outputs-only forward (engine/backends/engine.py); other nets and calls use torch.
        ``precision="auto"``: bf16 (torch's autocast, or OpenVINO's where OpenVINO is a
        candidate) where measured faster and close to fp32."""
        if precision not in ("fp32", "auto"):
            raise ValueError(f"precision {precision!r}: expected 'fp32' or 'auto'")
        request = requested_engine(engine)
        if request == "torch" and precision == "fp32":
            return
        if self._fast is None:
            log.info("net '%s': engine torch (engine %s serves only TEST nets fed by Input "
                     "layers, without Python layers)", self.module.name, request)
            return
        self._fast.use_engine(request, precision)

    @property
    def engine(self) -> str:
        """The engine computing ``forward()``'s outputs: torch, onnxruntime or openvino, or
        under ``precision="auto"`` torch-bf16 or openvino-bf16."""
        return "torch" if self._fast is None else self._fast.engine

    @property
    def fast_path(self) -> bool:
        """Whether a plain ``forward()`` runs the outputs-only fused net (a TEST net fed by
        Input layers, without Python layers or sinks; ``_pycaffe/fast.py``) rather than
        every layer in turn. Either way the blobs read the same; fixed when the net is built."""
        return self._fast is not None

    @classmethod
    def from_module(cls, module: NetModule) -> "Net":
        net = cls.__new__(cls)
        net._init_from_module(module)
        return net

    def _init_from_module(self, module: NetModule) -> None:
        self.module = module
        self.blob_state = BlobState()   # where each blob's values live (_pycaffe/state.py)
        self.blobs: "OrderedDict[str, Blob]" = OrderedDict(
            (name, Blob(shape, name, self.blob_state))
            for name, shape in module.blob_shapes.items())
        for name, w in module.loss_weights.items():
            self.blobs[name].diff[...] = w        # Caffe seeds loss tops' diffs at setup
        for index, layer in enumerate(module.layers):  # DummyData's constant tops: filled once
            for j, again in enumerate(getattr(layer, "refill", ())):
                if not again:
                    self.blob_state.put(module.layer_tops(index)[j], layer._once[j])
        self.backward_needs = backward_plan(module)   # read by the layer-by-layer backward
        self._layer_callbacks: dict[str, list] = {w: [] for w in CALLBACK_TIMES}
        self._fast = FastForward(self) if eligible(self) else None

    # -- pycaffe attributes -----------------------------------------------------------
    @property
    def params(self) -> "OrderedDict[str, BlobVec]":
        """Layer name -> its parameter blobs, as pycaffe's ``caffe._caffe.BlobVec``."""
        return OrderedDict((name, param_blobs(layer))
                           for name, layer in self.module.named_layers() if len(layer.blobs))

    @property
    def layers(self) -> LayerVec:
        return LayerVec(LayerView(n, l) for n, l in self.module.named_layers())

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
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict((n, self.module.loss_weights.get(n, 0.0)) for n in self.blobs)

    @property
    def _layer_names(self) -> StringVec:
        return StringVec(self.module.layer_names)

    @property
    def _blob_names(self) -> StringVec:
        return StringVec(self.blobs)

    @property
    def _inputs(self) -> IntVec:
        names = list(self.blobs)
        return IntVec(names.index(n) for n in self.inputs)

    @property
    def _outputs(self) -> IntVec:
        names = list(self.blobs)
        return IntVec(names.index(n) for n in self.outputs)

    @property
    def phase(self) -> int:
        return self.module.phase

    # -- running ----------------------------------------------------------------------
    def compute_device(self) -> torch.device:
        """Where the net's parameters live: the device its layers compute on."""
        # the layers' own parameter dicts: module.parameters() walks every submodule, which
        # cost more than a small layer on each batch-1 forward
        for layer in self.module.layers:
            for p in layer.blobs._parameters.values():
                return p.device
        return mode.device()

    def _push_params(self) -> None:
        """Edits made through ``net.params`` host mirrors (GPU, double) reach the tensors."""
        flush_host_mirrors()

    def _layer_range(self, first, last, default_first: int, default_last: int):
        names = self._layer_names
        for name in (first, last):
            if name is not None and name not in names:
                raise KeyError(f"no layer named '{name}' in net '{self.module.name}'")
        return (names.index(first) if first is not None else default_first,
                names.index(last) if last is not None else default_last)

    def _set_arrays(self, what: str, names: list[str], values: dict) -> None:
        if set(values) != set(names):
            raise ValueError(f"{what} arguments {sorted(values)} do not match the net's "
                             f"{'inputs' if what == 'Input blob' else 'outputs'} {sorted(names)}")
        for name, value in values.items():
            value = np.asarray(value)
            blob = self.blobs[name]
            if value.shape[:1] != blob.shape[:1]:
                raise ValueError(f"{what} '{name}' has shape {value.shape}: not batch sized "
                                 f"(the blob has {blob.shape}; call blob.reshape first)")
            target = blob.data if what == "Input blob" else blob.diff
            target[...] = value

    def forward(self, blobs=None, start=None, end=None, **kwargs) -> dict[str, np.ndarray]:
        """Run layers ``start``..``end`` (names, inclusive); returns the outputs' data (or
        ``end``'s tops) plus ``blobs``. Keywords feed every input blob (pycaffe's rule)."""
        try:
            return self._run_forward(blobs, start, end, kwargs)
        except RuntimeError as exc:       # torch's kernel message names no layer
            error = self._shape_error()
            if error is None:
                raise
            raise error from exc

    def _shape_error(self) -> LayerError | None:
        """The error naming the first layer that cannot take the input blobs' shapes (an
        input reshaped without ``net.reshape()``) or a parameter ``reshape`` gave it, or None
        when every layer can."""
        try:
            self.module.infer_shapes({n: self.blobs[n].shape for n in self.inputs})
        except LayerError as exc:
            return LayerError(with_context(str(exc), self.module.source))
        except Exception:   # noqa: BLE001 - any other failure: the forward's own error stands
            return None
        reason = surgery_error(self.module)
        return None if reason is None else LayerError(with_context(reason, self.module.source))

    def _run_forward(self, blobs, start, end, kwargs: dict) -> dict[str, np.ndarray]:
        if self._fast is not None and not blobs and start is None and end is None \
                and not self._forward_callbacks():
            if kwargs:                # the outputs-only fast path, with no per-call planning
                self._set_arrays("Input blob", self.inputs, kwargs)
            self._push_params()
            self._fast.run()          # outputs only; the other blobs fill in when read
            blobs = self.blobs
            return {name: blobs[name].data for name in self.module.output_names}
        start_i, end_i = self._layer_range(start, end, 0, len(self.module.layers) - 1)
        # pycaffe builds a set here, whose order Python 3 randomises per process; scripts
        # index the dict's keys (rtpose's demo: output 0 the PAFs, 1 the heatmaps), so keep
        # Caffe's output order, then the extra blobs as asked
        wanted = _ordered(self.top_names[end] if end is not None else self.outputs, blobs)
        if kwargs:
            self._set_arrays("Input blob", self.inputs, kwargs)
        self._push_params()
        # from the first layer to the last everything is recomputed; blobs outside the
        # range keep the last forward's values, which a fast forward left stale
        self._fresh_blobs(needed=start_i > 0 or end_i < len(self.module.layers) - 1)
        forward_range(self, start_i, end_i, self.compute_device())
        return {name: self.blobs[name].data for name in wanted}

    def _fresh_blobs(self, needed: bool = True) -> None:
        """Blobs a fast forward left stale get their values (``needed``: they are read next)
        or are marked fresh (a full forward is about to overwrite them)."""
        if needed:
            self.blob_state.refresh()
        else:
            self.blob_state.clear_stale()

    def backward(self, diffs=None, start=None, end=None, **kwargs) -> dict[str, np.ndarray]:
        """Run layers ``start`` down to ``end`` backward from the blobs' diffs (loss tops hold
        their loss_weight; any top diff set by hand is used); returns the inputs' diffs (or
        ``end``'s bottoms') plus ``diffs``. Parameter diffs accumulate until
        ``clear_param_diffs``, as in Caffe."""
        start_i, end_i = self._layer_range(start, end, len(self.module.layers) - 1, 0)
        wanted = _ordered(self.bottom_names[end] if end is not None else self.inputs, diffs)
        self._fresh_blobs()
        if kwargs:
            self._set_arrays("Top diff", self.outputs, kwargs)
        self._push_params()
        backward_range(self, start_i, end_i, self.compute_device())
        return {name: self.blobs[name].diff for name in wanted}

    def _batch(self, blobs: dict):
        """Split equal-length arrays into batches of the net's batch size; the last batch is
        zero-padded (pycaffe's ``_Net_batch``)."""
        num = len(next(iter(blobs.values())))
        batch_size = next(iter(self.blobs.values())).shape[0]
        for i in range(0, num - num % batch_size, batch_size):
            yield {name: blobs[name][i:i + batch_size] for name in blobs}
        remainder = num % batch_size
        if remainder:
            padded = {}
            for name, value in blobs.items():
                value = np.asarray(value)
                pad = np.zeros((batch_size - remainder,) + value.shape[1:])
                padded[name] = np.concatenate([value[-remainder:], pad])
            yield padded

    def forward_all(self, blobs=None, **kwargs) -> dict[str, np.ndarray]:
        """``forward`` over inputs of any length, in batches; padding is dropped."""
        outs = {name: [] for name in _ordered(self.outputs, blobs)}
        for batch in self._batch(kwargs):
            for name, value in self.forward(blobs=blobs, **batch).items():
                outs[name].extend(value.copy())
        result = {name: np.asarray(v) for name, v in outs.items()}
        return _drop_padding(result, kwargs)

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """Batched forward then backward; keywords name inputs (forward) and outputs
        (backward). Returns (blobs dict, diffs dict) without padding."""
        outs = {name: [] for name in _ordered(self.outputs, blobs)}
        grads = {name: [] for name in _ordered(self.inputs, diffs)}
        fwd = self._batch({n: kwargs[n] for n in self.inputs if n in kwargs}) \
            if any(n in kwargs for n in self.inputs) else iter(())
        bwd = self._batch({n: kwargs[n] for n in self.outputs if n in kwargs}) \
            if any(n in kwargs for n in self.outputs) else iter(())
        for fb, bb in zip_longest(fwd, bwd, fillvalue={}):
            for name, value in self.forward(blobs=blobs, **fb).items():
                outs[name].extend(value.copy())
            for name, value in self.backward(diffs=diffs, **bb).items():
                grads[name].extend(value.copy())
        all_outs = _drop_padding({n: np.asarray(v) for n, v in outs.items()}, kwargs)
        all_diffs = _drop_padding({n: np.asarray(v) for n, v in grads.items()}, kwargs)
        return all_outs, all_diffs

    def set_input_arrays(self, data, labels) -> None:
        """Hand (N, C, H, W) data and N labels to the net's first layer, which must be a
        MemoryData layer (pycaffe's rule); the arrays are used by reference when already
        float32 and contiguous, so later edits to them reach the next forward, as in Caffe."""
        first = self.module.layers[0] if len(self.module.layers) else None
        if getattr(first, "type", None) != "MemoryData":
            raise ValueError(f"net '{self.module.name}': set_input_arrays may only be called "
                             "if the first layer is a MemoryData layer")
        first.set_input_arrays(data, labels)

    def clear_param_diffs(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def reshape(self) -> None:
        """Propagate the Input blobs' current shapes through the net (Caffe's Net::Reshape).
        At the input shapes the last fast forward ran at, the blobs it left stale stay
        stale: their recompute gives them these very shapes. At other shapes a stale blob
        whose element count changes gets zeros without that recompute, as any blob whose
        count changes does (Caffe's values there are memory of another blob size): a
        pyramid's ``reshape`` per scale no longer runs the whole net layer by layer."""
        inputs = {n: self.blobs[n].shape for n in self.inputs}
        shapes = self.module.infer_shapes(inputs)
        state = self.blob_state
        fast = self._fast
        unchanged = fast is not None and fast.ran_at(inputs)
        zeroed = frozenset()
        if fast is not None and not unchanged and state.stale_names():
            before = self.module.infer_shapes(fast.ran_at_shapes())
            stale = state.stale_names()
            if all(math.prod(before[n]) != math.prod(shapes[n])
                   for n in stale if n in shapes):
                state.clear_stale()           # nothing of their values would survive
                zeroed = stale
        for name, shape in shapes.items():
            if not (unchanged and state.is_stale(name)):
                state.reshape(name, shape, fresh=name in zeroed)   # budgeted; names the blob

    # -- weights ----------------------------------------------------------------------
    def copy_from(self, path) -> None:
        self._push_params()
        weights.copy_from(self.module, os.fspath(path))

    def save(self, path) -> None:
        self._push_params()
        weights.save(self.module, os.fspath(path))

    def save_hdf5(self, path) -> None:
        self._push_params()
        weights.save_h5(self.module, os.fspath(path))

    def load_hdf5(self, path) -> None:
        self._push_params()
        weights.copy_from(self.module, os.fspath(path), hdf5=True)

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s parameter storage for every layer of the same name (no copy)."""
        self._push_params()
        other._push_params()
        self.module.share_trained_layers_with(other.module)

    def __repr__(self) -> str:
        return f"<caffe_compat.Net '{self.module.name}' phase={'TRAIN' if self.phase == 0 else 'TEST'}>"


def _ordered(first, more) -> list[str]:
    """``first`` then ``more``, each name once, in that order."""
    return list(dict.fromkeys(list(first) + list(more or ())))


def _drop_padding(arrays: dict, kwargs: dict) -> dict:
    """Cut the zero-padded tail ``_batch`` added (pycaffe compares the first output's length
    with the first keyword's)."""
    if not arrays or not kwargs:
        return arrays
    pad = len(next(iter(arrays.values()))) - len(next(iter(kwargs.values())))
    if pad > 0:
        return {name: value[:-pad] for name, value in arrays.items()}
    return arrays


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
