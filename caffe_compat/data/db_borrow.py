"""The database a script still has open, found so that a net's reader can share it.

py-lmdb (2.0 on) and LevelDB refuse a second open of a database in one process; Caffe's C++
readers opened it regardless, so a script or notebook that wrote an LMDB with its own
``lmdb.open()`` and trained on it in the same process worked there. db.py's readers, refused,
look here for the caller's open ``lmdb.Environment`` / ``plyvel.DB`` on the same files and
read through it (read transactions on one environment are what LMDB allows).
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Iterator


def open_environment(path: str):
    """The open ``lmdb.Environment`` of this process on the LMDB at ``path`` (the same
    data file), or None. LMDB allows any number of read transactions on one environment;
    what it forbids is a second environment on the same files."""
    import lmdb
    try:
        wanted = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return None
    for obj in _reachable(lmdb.Environment):
        try:
            obj.info()                       # raises once closed (path() still answers)
            found = os.stat(os.path.join(os.fsdecode(obj.path()), "data.mdb"))
        except (lmdb.Error, OSError):          # closed, or a subdir=False file
            continue
        if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
            return obj
    return None


def open_leveldb(path: str):
    """The open ``plyvel.DB`` of this process on the LevelDB folder ``path``, or None."""
    import plyvel
    wanted = os.path.realpath(path)
    return next((db for db in _reachable(plyvel.DB)
                 if not db.closed and os.path.realpath(db.name) == wanted), None)


def _reachable(kind: type) -> Iterator:
    """Objects of ``kind`` the program holds: in the local variables of every running
    call, then among what the collector's objects (module globals, instance attributes)
    refer to. Environments are not tracked by the collector themselves, and the frames of
    running calls need not exist as objects until asked for. ~0.1 s with torch loaded."""
    for frame in sys._current_frames().values():
        while frame is not None:
            yield from (v for v in frame.f_locals.values() if type(v) is kind)
            frame = frame.f_back
    for holder in gc.get_objects():
        yield from (obj for obj in gc.get_referents(holder) if type(obj) is kind)


__all__ = ["open_environment", "open_leveldb"]
