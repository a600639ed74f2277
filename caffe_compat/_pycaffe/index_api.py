"""The members of pycaffe's compiled ``Net`` that address blobs and layers by index:
``_blobs``, ``_top_ids(i)``, ``_bottom_ids(i)``, ``_blob_loss_weights``, and
``_forward(start, end)`` / ``_backward(start, end)`` (Net::ForwardFromTo / BackwardFromTo).
pycaffe's own Python code builds ``blobs``/``forward`` on them, and layer-dump and pruning
scripts call them directly. A mixin of ``caffe_compat._pycaffe.net.Net``.
"""
from __future__ import annotations

import numpy as np

from caffe_compat._pycaffe.layerwise import backward_range, forward_range
from caffe_compat.engine.layers.blob_vectors import DtypeVec, IntVec


class IndexAPI:
    """Index-based access; ``self`` is a pycaffe Net."""

    @property
    def _blobs(self) -> list:
        """Every blob, in ``_blob_names`` order."""
        return list(self.blobs.values())

    @property
    def _blob_loss_weights(self) -> DtypeVec:
        return DtypeVec(self.blob_loss_weights.values())

    def _blob_ids(self, names) -> IntVec:
        index = {name: i for i, name in enumerate(self.blobs)}
        return IntVec(index[name] for name in names)

    def _top_ids(self, layer_index: int) -> IntVec:
        return self._blob_ids(self.top_names[self._layer_names[layer_index]])

    def _bottom_ids(self, layer_index: int) -> IntVec:
        return self._blob_ids(self.bottom_names[self._layer_names[layer_index]])

    def _forward(self, start: int, end: int) -> float:
        """Run layers ``start``..``end`` (indices, inclusive); the loss they produced, summed
        in float32 as Caffe's ForwardFromTo sums each layer's weighted loss tops."""
        start, end = self._index_range(start, end)
        self._push_params()
        self._fresh_blobs(needed=start > 0 or end < len(self.module.layers) - 1)
        forward_range(self, start, end, self.compute_device())
        loss = np.float32(0)
        weights = self.module.loss_weights
        for layer in self._layer_names[start:end + 1]:
            for top in self.top_names[layer]:
                if weights.get(top):
                    loss += np.float32(weights[top]) * self.blobs[top].data.sum(
                        dtype=np.float32)
        return float(loss)

    def _backward(self, start: int, end: int) -> None:
        """Run layers ``start`` down to ``end`` (indices) backward from the current diffs."""
        end, start = self._index_range(end, start)
        self._fresh_blobs()
        self._push_params()
        backward_range(self, start, end, self.compute_device())

    def _index_range(self, low: int, high: int) -> tuple[int, int]:
        count = len(self.module.layers)
        for i in (low, high):
            if not 0 <= int(i) < count:
                raise IndexError(f"layer index {i} out of range (net '{self.module.name}' "
                                 f"has {count} layers)")
        return int(low), int(high)
