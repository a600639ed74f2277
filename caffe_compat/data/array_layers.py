"""Caffe's HDF5Data and MemoryData layers: batches from arrays rather than images.

They share the data-layer machinery of ``layers.py`` (prefetch, seeking, batch streams).
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np
import torch

from caffe_compat.data.source_layer import _EPOCH_STREAM, _DataLayer
from caffe_compat.engine.layers.base import Shape, register
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.hdf5 import check_dataset, dataset, open_hdf5, read_dataset


@register
class HDF5Data(_DataLayer):
    """Rows of HDF5 datasets named like the tops, from the files listed in ``source``.

    No transformation (as in Caffe). Files are read one at a time, in list order, with
    ``shuffle`` permuting the files each epoch and the rows of each file.
    """

    type = "HDF5Data"
    family = "data"
    num_tops = (1, None)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        hp = param.hdf5_data_param
        if param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data (remove transform_param)")
        if hp.batch_size <= 0:
            raise self.error("hdf5_data_param.batch_size must be positive")
        self.batch_size = hp.batch_size
        try:
            self._files = _hdf5_files(hp.source)
            rows, shapes = _hdf5_layout(self._files, list(param.top))
        except DataError as exc:
            raise self._wrap(exc) from None
        self._shapes = [(self.batch_size,) + s for s in shapes]
        produce = _HDF5Batches(self._files, rows, list(param.top), self.batch_size, hp.shuffle,
                               self._seed)
        self._start(produce, 2, workers=1)


def _hdf5_files(source: str) -> list[str]:
    """The .h5 paths in a source list: as written, or relative to the list's folder."""
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{source}: HDF5 source list does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:   # a directory, unreadable, not text
        raise DataError(f"{source}: cannot read the HDF5 source list "
                        f"({getattr(exc, 'strerror', None) or 'not UTF-8 text'})") from None
    files = []
    base = os.path.dirname(source)
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        path = name if os.path.exists(name) else os.path.join(base, name)
        if not os.path.isfile(path):
            raise DataError(f"{source}:{number}: HDF5 file '{name}' does not exist")
        files.append(os.path.abspath(path))
    if not files:
        raise DataError(f"{source}: lists no HDF5 files")
    return files


def _hdf5_layout(files, tops):
    """Rows per file and the per-row shape of every top's dataset (checked across files)."""
    rows, shapes = [], None
    for path in files:
        with open_hdf5(path, "HDF5 data file") as f:
            missing = [t for t in tops if t not in f]
            if missing:
                raise DataError(f"{path}: no dataset named '{missing[0]}' (datasets: "
                                f"{', '.join(f.keys())})")
            found = [check_dataset(dataset(f, t, path), f"{path}: dataset '{t}'") for t in tops]
            n = {s[0] if s else 0 for s in found}
            if len(n) != 1:
                raise DataError(f"{path}: datasets {', '.join(tops)} differ in row count")
            file_shapes = [tuple(s[1:]) for s in found]
        if shapes is not None and file_shapes != shapes:
            raise DataError(f"{path}: dataset shapes {file_shapes} differ from {files[0]}'s "
                            f"{shapes}")
        shapes = file_shapes
        rows.append(n.pop())
    if sum(rows) == 0:
        raise DataError(f"{files[0]}: the HDF5 files hold no rows")
    return rows, shapes


class _HDF5Batches:
    """produce(k) for HDF5Data over the endless stream of (epoch, file, row) positions."""

    def __init__(self, files, rows, tops, batch_size, shuffle, seed):
        self.files, self.rows, self.tops, self.n = files, rows, tops, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.total = sum(rows)
        self._cache: dict[str, list[np.ndarray]] = {}
        self._perms: dict[tuple[int, ...], np.ndarray] = {}
        self._lock = threading.Lock()

    def _load(self, path):
        with self._lock:
            if path not in self._cache:
                with open_hdf5(path, "HDF5 data file") as f:
                    arrays = [read_dataset(dataset(f, t, path), f"{path}: dataset '{t}'")
                              for t in self.tops]
                if len(self._cache) >= 2:           # keep the current and the previous file
                    self._cache.pop(next(iter(self._cache)))
                self._cache[path] = arrays
            return self._cache[path]

    def _perm(self, *key: int) -> np.ndarray:
        """The seeded permutation for (epoch,) files or (epoch, file) rows, cached."""
        with self._lock:
            perm = self._perms.get(key)
            if perm is None:
                size = len(self.files) if len(key) == 1 else self.rows[key[1]]
                perm = np.random.default_rng(self.seed + [_EPOCH_STREAM, *key]).permutation(size)
                if len(self._perms) > 64:
                    self._perms.clear()
                self._perms[key] = perm
            return perm

    def _locate(self, p: int):
        epoch, offset = divmod(p, self.total)
        order = self._perm(epoch) if self.shuffle else range(len(self.files))
        for fi in order:
            fi = int(fi)
            if offset < self.rows[fi]:
                return fi, int(self._perm(epoch, fi)[offset]) if self.shuffle else offset
            offset -= self.rows[fi]
        raise AssertionError("unreachable")

    def __call__(self, k: int):
        out = None
        for i in range(self.n):
            fi, row = self._locate(k * self.n + i)
            arrays = self._load(self.files[fi])
            if out is None:
                out = [np.empty((self.n,) + a.shape[1:], dtype=np.float32) for a in arrays]
            for o, a in zip(out, arrays):
                o[i] = a[row]
        return tuple(out)


@register
class MemoryData(_DataLayer):
    """Batches from arrays handed over with ``set_input_arrays(data, labels)`` (pycaffe)."""

    type = "MemoryData"
    family = "data"
    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        mp = param.memory_data_param
        if min(mp.batch_size, mp.channels, mp.height, mp.width) <= 0:
            raise self.error("memory_data_param needs positive batch_size, channels, height "
                             "and width")
        self.batch_size = mp.batch_size
        self._item = (mp.channels, mp.height, mp.width)
        self._shapes = [(mp.batch_size,) + self._item, (mp.batch_size,)]
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._pos = 0

    def set_input_arrays(self, data, labels) -> None:
        """Use ``data`` (M, C, H, W) and ``labels`` (M,) from the next forward on; M must be a
        multiple of batch_size. Values are used as given (no transformation), as in Caffe."""
        data = np.ascontiguousarray(torch.as_tensor(data).cpu().numpy(), dtype=np.float32)
        labels = np.ascontiguousarray(torch.as_tensor(labels).cpu().numpy(),
                                      dtype=np.float32).reshape(-1)
        if data.ndim != 4 or tuple(data.shape[1:]) != self._item:
            raise self.error(f"data must be (M, {', '.join(map(str, self._item))}), got "
                             f"{tuple(data.shape)}")
        if len(labels) != len(data):
            raise self.error(f"{len(data)} data items but {len(labels)} labels")
        if len(data) == 0 or len(data) % self.batch_size:
            raise self.error(f"the number of items ({len(data)}) must be a positive multiple "
                             f"of batch_size {self.batch_size}")
        self._data, self._labels, self._pos = data, labels, 0

    reset = set_input_arrays

    def forward(self):
        if self._data is None:
            raise self.error("no data: call set_input_arrays(data, labels) before forward")
        n, p = self.batch_size, self._pos
        self._pos = (p + n) % len(self._data)
        return self._tops((self._data[p:p + n], self._labels[p:p + n]))
