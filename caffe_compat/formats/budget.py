"""The memory budget: the most bytes one declared size in an input may ask for.

A file or a definition declares sizes (a blob's shape, an image's width and height, an HDF5
dataset's extent) before the data that fills them. A flipped bit can make a 6 KB file ask for
terabytes; allocating first means the process dies, or the machine swaps. Every reader checks
the declared size against the data actually present where it can, and against this budget
always, and raises ResourceError naming the file and the blob.

``$CAFFE_COMPAT_MEMORY_BUDGET`` sets the budget in bytes (suffixes K, M, G, T allowed); the
default is half of the machine's physical memory.
"""
from __future__ import annotations

import functools
import math
import operator
import os
from typing import Iterable

from caffe_compat.formats.errors import ResourceError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_budget() -> int:
    """The budget in bytes: $CAFFE_COMPAT_MEMORY_BUDGET, else half the physical memory."""
    text = os.environ.get("CAFFE_COMPAT_MEMORY_BUDGET", "").strip().upper().rstrip("B")
    if text:
        unit = text[-1] if text[-1] in _UNITS else ""
        number = text[:-1] if unit else text
        try:
            return int(float(number) * _UNITS[unit])
        except ValueError:
            raise ResourceError(f"CAFFE_COMPAT_MEMORY_BUDGET={text!r}: expected a byte count "
                                "such as 8G") from None
    return _half_the_ram()


@functools.lru_cache(maxsize=1)
def _half_the_ram() -> int:
    """Half the physical memory (asked once: a net of 100k layers checks every top)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def shape_bytes(shape: Iterable[int], itemsize: int = 4) -> int:
    """Bytes of a dense array of ``shape`` (exact, arbitrary precision)."""
    return math.prod(int(d) for d in shape) * itemsize


def human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


MAX_AXES = 32   # Caffe's kMaxBlobAxes (blob.hpp): a blob has at most 32 axes


def check_shape(shape: Iterable[int], where: str, itemsize: int = 4,
                allow_empty: bool = True) -> tuple[int, ...]:
    """``shape`` as ints; ResourceError if a dim is not an integer or negative (or zero, unless
    ``allow_empty``), there are more than Caffe's 32 axes, or the array exceeds the budget."""
    shape = list(shape)
    try:
        dims = tuple(_whole(d) for d in shape)
    except TypeError:
        raise ResourceError(f"{where}: shape {shape} must be whole numbers") from None
    if len(dims) > MAX_AXES:
        raise ResourceError(f"{where}: shape has {len(dims)} axes; Caffe's blobs have at most "
                            f"{MAX_AXES} (kMaxBlobAxes)")
    if any(d < 0 for d in dims):
        raise ResourceError(f"{where}: negative dimension in shape {list(dims)}")
    if not allow_empty and 0 in dims:
        raise ResourceError(f"{where}: shape {list(dims)} has a zero dimension: an empty blob "
                            "(a batch of no items) cannot run through the net")
    check_bytes(shape_bytes(dims, itemsize), where, f"shape {list(dims)}")
    return dims


def _whole(value) -> int:
    """An integer dimension (a float only when it is whole); TypeError otherwise."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return operator.index(value)


def check_bytes(nbytes: int, where: str, what: str = "it") -> None:
    budget = memory_budget()
    if nbytes > budget:
        raise ResourceError(f"{where}: {what} needs {human(nbytes)}, more than the memory "
                            f"budget of {human(budget)} (CAFFE_COMPAT_MEMORY_BUDGET)")
