"""HDF5Output (``hdf5_output_layer.cpp``): writes its two bottoms to an HDF5 file.

The file (``hdf5_output_param.file_name``) is created empty when the net is built, as Caffe
truncates it at setup. Each forward writes datasets ``data`` and ``label`` holding the
bottoms in Caffe's legacy 4-D shape ``(num, channels, height, width)`` (trailing 1s
added), float32. Caffe can write one batch per file: a second forward would fail on the
existing datasets there, and raises a clear error here. No tops, no backward.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.formats.atomic import atomic_path


@register
class HDF5Output(Layer):
    type = "HDF5Output"
    family = "data"
    num_bottoms = (2, 2)
    num_tops = (0, 0)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.file_name = param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is required")
        self.top_shapes(bottom_shapes)
        self._written = False
        self._write({})

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        data, label = (tuple(s) for s in bottom_shapes)
        if not data or not label or data[0] != label[0]:
            raise self.error(f"data {list(data)} and label {list(label)} must have the same "
                             "batch size")
        for what, s in (("data", data), ("label", label)):
            if len(s) > 4:
                raise self.error(f"{what} has {len(s)} axes; HDF5Output writes 4-D blobs")
        return []

    def _write(self, datasets: dict[str, np.ndarray]) -> None:
        import h5py
        try:
            with atomic_path(self.file_name) as tmp, h5py.File(tmp, "w") as f:
                for name, values in datasets.items():
                    f.create_dataset(name, data=values)
        except OSError as exc:
            raise self.error(f"cannot write HDF5 file '{self.file_name}': {exc}") from None

    def forward(self, data: torch.Tensor, label: torch.Tensor):
        self.top_shapes([tuple(data.shape), tuple(label.shape)])
        if self._written:
            raise self.error(f"'{self.file_name}' already holds a batch; Caffe's HDF5Output "
                             "writes one batch per net (a second forward fails there too)")
        arrays = {name: t.detach().cpu().float().numpy().reshape(legacy_shape(tuple(t.shape)))
                  for name, t in (("data", data), ("label", label))}
        self._write(arrays)
        self._written = True
        return ()
