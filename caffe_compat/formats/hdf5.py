"""Reading HDF5 inputs (caffemodel.h5, solverstate.h5, HDF5Data files) without raw h5py errors
or allocations larger than the file can hold.

``open_hdf5`` turns every h5py/HDF5 library error inside its block into one DataError line
naming the file; ``read_dataset`` checks a dataset's declared shape before reading it: no
negative or budget-busting extents, numeric values only, and — for uncompressed datasets —
no more bytes than the file itself holds.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np

from caffe_compat.formats.budget import check_shape, human, shape_bytes
from caffe_compat.formats.errors import CaffeCompatError, DataError

_LIBRARY_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError,
                   OverflowError, AttributeError)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


@contextlib.contextmanager
def open_hdf5(path: str, what: str = "HDF5 file") -> Iterator:
    """``h5py.File(path, "r")``; library errors opening or reading it become DataError."""
    import h5py
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not an {what}")
    try:
        f = h5py.File(path, "r")
    except _LIBRARY_ERRORS as exc:
        raise DataError(f"{path}: cannot open as an {what} ({_reason(exc)})") from None
    try:
        with f:
            yield f
    except CaffeCompatError:
        raise
    except _LIBRARY_ERRORS as exc:
        raise DataError(f"{path}: corrupt {what} ({_reason(exc)})") from None


def dataset(group, name: str, where: str):
    """``group[name]`` when it is a dataset; DataError otherwise."""
    import h5py
    try:
        obj = group.get(name)
    except _LIBRARY_ERRORS as exc:
        raise DataError(f"{where}: cannot read '{name}' ({_reason(exc)})") from None
    if not isinstance(obj, h5py.Dataset):
        state = "missing" if obj is None else "a group, not a dataset"
        raise DataError(f"{where}: '{name}' is {state}")
    return obj


def check_dataset(ds, where: str, file_size: int | None = None) -> tuple[int, ...]:
    """The dataset's shape, after checking it can be read into memory as float32/float64."""
    if ds.dtype.kind not in "fiub":
        raise DataError(f"{where}: holds {ds.dtype} values, not numbers")
    shape = check_shape(ds.shape, where, max(4, ds.dtype.itemsize))
    stored = shape_bytes(shape, ds.dtype.itemsize)
    if ds.chunks is None and ds.compression is None and stored:
        size = file_size if file_size is not None else os.path.getsize(ds.file.filename)
        if stored > size:
            raise DataError(f"{where}: declares shape {list(shape)} ({human(stored)}) but the "
                            f"file holds only {human(size)}")
    return shape


def read_dataset(ds, where: str, dtype=np.float32) -> np.ndarray:
    """The checked dataset's values as ``dtype`` (a scalar dataset gives a 0-d array)."""
    check_dataset(ds, where)
    try:
        return np.asarray(ds[()], dtype=dtype)
    except _LIBRARY_ERRORS as exc:
        raise DataError(f"{where}: cannot read the values ({_reason(exc)})") from None
