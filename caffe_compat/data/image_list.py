"""Caffe image lists (``relative/path label`` per line) with errors that name file and line.

Caffe splits each line at its *last* space, so paths may contain spaces; the label must be an
integer (Caffe's atoi silently turns "cat" into 0, we refuse it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from caffe_compat.formats.atomic import atomic_write
from caffe_compat.formats.errors import DataError


@dataclass(frozen=True)
class ListEntry:
    """One list line: the path as written, its integer label, and where it came from."""
    path: str
    label: int
    line: int          # 1-based line number in the list file


def read_image_list(list_file: str | os.PathLike) -> list[ListEntry]:
    """Parse a Caffe list file; blank lines are skipped (their numbers still count)."""
    name = os.fspath(list_file)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{name}: list file does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{name}: list file is a directory, not a text file") from None
    except UnicodeDecodeError:
        raise DataError(f"{name}: list file is not UTF-8 text") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip():
            continue
        path, sep, label = line.rpartition(" ")
        if not sep or not path:
            raise DataError(f"{name}:{number}: expected 'relative/path label', got {line!r}")
        value = parse_label(label, f"{name}:{number}")
        entries.append(ListEntry(path, value, number))
    return entries


_INT32 = (-(1 << 31), (1 << 31) - 1)   # Datum.label is an int32


def parse_label(text: str, where: str) -> int:
    """An ASCII decimal integer that fits Datum.label (int32); ``int()`` alone would also take
    "1_0", "+5" or non-ASCII digits such as "٣"."""
    digits = text[1:] if text[:1] == "-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise DataError(f"{where}: label {text!r} is not an integer")
    value = int(text)
    if not _INT32[0] <= value <= _INT32[1]:
        raise DataError(f"{where}: label {value} does not fit a 32-bit integer (Datum.label)")
    return value


def write_image_list(list_file: str | os.PathLike, items) -> None:
    """Write ``(path, label)`` pairs in Caffe's list format, atomically."""
    with atomic_write(list_file, "w") as f:
        for rel, label in items:
            f.write(f"{rel} {int(label)}\n")
