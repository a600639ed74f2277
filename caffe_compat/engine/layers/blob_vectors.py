"""The container types pycaffe's extension hands out (``caffe._caffe.BlobVec`` and siblings)
and the ``Phase`` a Python layer sees.

Scripts test them by exact type: MobileNet-SSD's merge_bn.py keeps only the
``net.params`` entries whose ``type(...) is caffe._caffe.BlobVec``. They live here, under the
pycaffe surface, because Python layers (this package) hand out BlobVec and RawBlobVec too.
"""
from __future__ import annotations

from typing import Callable

import torch


class BlobVec:
    """A layer's parameter blobs (pycaffe's ``BlobVec``): ``len``, indexing (negative and
    slices too), iteration, and ``add_blob(*shape)``, which appends a zero-filled learnable
    blob that caffemodels save and load. ``view(params, i)`` makes the object for blob i."""

    def __init__(self, params: torch.nn.ParameterList, view: Callable):
        self._params, self._view = params, view

    def add_blob(self, *shape: int) -> None:
        dims = tuple(int(s) for s in shape)
        self._params.append(torch.nn.Parameter(torch.zeros(dims, dtype=torch.float32)))

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if not -len(self) <= index < len(self):
            raise IndexError(f"blob index {index} out of range ({len(self)} blobs)")
        return self._view(self._params, index % len(self))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"BlobVec({[tuple(p.shape) for p in self._params]})"


class RawBlobVec(list):
    """The bottom and top blob lists a Python layer's methods receive."""


class LayerVec(list):
    """``net.layers``."""


class StringVec(list):
    """``net._layer_names``, ``net._blob_names``."""


class IntVec(list):
    """``net._inputs``, ``net._outputs``, ``net._bottom_ids(i)``, ``net._top_ids(i)``."""


class DtypeVec(list):
    """``net._blob_loss_weights``."""


class NetVec(list):
    """``solver.test_nets``."""


class BoolVec(list):
    """A Python layer backward's ``propagate_down``."""


class Phase(int):
    """``self.phase`` of a Python layer: equal to ``caffe.TRAIN`` (0) / ``caffe.TEST`` (1) as
    BVLC's int, and ``str(self.phase)`` is 'TRAIN' / 'TEST' as caffe-fast-rcnn's enum (whose
    py-faster-rcnn layers use it as a config key)."""

    def __str__(self) -> str:
        return ("TRAIN", "TEST")[int(self)]

    __repr__ = __str__
    name = property(__str__)
