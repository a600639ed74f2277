"""Per-layer callbacks of pycaffe's ``caffe.Net`` (Caffe's Net::add_before_forward and its
three siblings): functions of the layer index run around each layer's forward or backward."""
from __future__ import annotations

from caffe_compat._runtime import NCCL

CALLBACK_TIMES = ("before_forward", "after_forward", "before_backward", "after_backward")


class LayerCallbacks:
    """Mixed into ``Net``, which fills ``_layer_callbacks`` ({time: [fn, ...]})."""

    _layer_callbacks: dict[str, list]

    def before_forward(self, fn) -> None:
        """``fn(layer_index)`` before each layer's forward."""
        self._layer_callbacks["before_forward"].append(fn)

    def after_forward(self, fn) -> None:
        self._layer_callbacks["after_forward"].append(fn)

    def before_backward(self, fn) -> None:
        self._layer_callbacks["before_backward"].append(fn)

    def after_backward(self, fn) -> None:
        """``fn(layer_index)`` after each layer's backward. A ``caffe.NCCL`` given here (train.py
        with ``layer_wise_reduce``) averages the gradients once the backward is done."""
        if isinstance(fn, NCCL):
            fn.attach()
            return
        self._layer_callbacks["after_backward"].append(fn)

    def layer_callbacks(self, when: str) -> list:
        """The callbacks registered for ``when`` (before_forward ... after_backward)."""
        return self._layer_callbacks[when]

    def has_layer_callbacks(self) -> bool:
        return any(self._layer_callbacks.values())

    def _forward_callbacks(self) -> bool:
        """Forward callbacks see each layer: the outputs-only fast path runs none of them."""
        callbacks = self._layer_callbacks
        return bool(callbacks["before_forward"] or callbacks["after_forward"])
