"""Checks that keep a corrupt database from taking the process down (issue 12).

liblmdb trusts the file it maps: a truncated ``data.mdb`` makes it read past the end of the
file (SIGBUS) and in-place corruption can make it abort (SIGABRT) or fault. Two guards run
before a database is opened in this process:

1. ``check_lmdb_meta``: the two meta pages (pages 0 and 1) are read with plain file I/O and
   checked against liblmdb's on-disk layout: magic 0xBEEFC0DE, data version 1, a power-of-two
   page size, and — for the meta liblmdb will pick (the larger txnid) — a last page number
   and tree roots that lie inside the file. This catches every truncation, cheaply.
2. ``probe``: ``db_probe.py`` walks the whole database (keys by cursor, each value looked up
   from the root) in a child process, so a crash kills the child and becomes a DataError
   naming the database. Once a database's files (device, inode, size, mtime, ctime) have
   passed, they are not probed again in this process; the Data layer's reads then run
   in-process at full speed. A pass is remembered only for files last changed well before the
   probe started: two writes within one timestamp tick leave the same size and times, so a
   file changed that recently could change again unseen (git's "racy clean" rule).

Both libraries map the files they read. A file truncated under the mapping makes the next read
fault (SIGBUS), so readers take ``file_stamps`` when they open and ask ``changed_in_place``
before each read: a mapped file rewritten in place becomes a DataError naming it. A file
replaced by a new one (written elsewhere and renamed, as our writers do) is harmless: the
mapping keeps the old file alive.

``$CAFFE_COMPAT_DB_PROBE``: ``full`` (default) copies every value in the child when data.mdb
is at most ``FULL_PROBE_BYTES``, else only the trees are walked; ``tree`` always walks the
trees only; ``off`` skips the child (trusted databases; the meta check still runs).
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from caffe_compat.formats.errors import DataError

LMDB_MAGIC = 0xBEEFC0DE
LMDB_VERSION = 1                     # MDB_DATA_VERSION of liblmdb 0.9 (py-lmdb's bundled copy)
PAGE_HEADER = 16                     # pgno(8) pad(2) flags(2) lower/upper(4), 64-bit builds
P_META = 0x08
INVALID_PAGE = 0xFFFFFFFFFFFFFFFF    # P_INVALID: the root of an empty tree
FULL_PROBE_BYTES = 4 << 30
_DB_RECORD = struct.Struct("<IHH5Q")  # MDB_db: pad/psize, flags, depth, 3 page counts, entries, root
RACY_SECONDS = 2.0                   # a file changed this recently may change again unseen
_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()


def _parse_meta(page: bytes) -> dict | None:
    """The fields of one meta page, or None when its magic or flags are not a meta page's."""
    if len(page) < PAGE_HEADER + 136:
        return None
    flags = struct.unpack_from("<H", page, 10)[0]
    magic, version = struct.unpack_from("<II", page, PAGE_HEADER)
    if magic != LMDB_MAGIC or not flags & P_META:
        return None
    mapsize = struct.unpack_from("<Q", page, PAGE_HEADER + 16)[0]
    free_db = _DB_RECORD.unpack_from(page, PAGE_HEADER + 24)
    main_db = _DB_RECORD.unpack_from(page, PAGE_HEADER + 72)
    last_pg, txnid = struct.unpack_from("<QQ", page, PAGE_HEADER + 120)
    return {"version": version, "psize": free_db[0], "mapsize": mapsize, "last_pg": last_pg,
            "txnid": txnid, "roots": (free_db[7], main_db[7]), "depths": (free_db[2], main_db[2])}


def check_lmdb_meta(folder: str | os.PathLike) -> None:
    """DataError unless ``folder/data.mdb``'s meta pages describe a tree inside the file."""
    path = Path(folder) / "data.mdb"
    name = os.fspath(folder)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(PAGE_HEADER + 136)
            first = _parse_meta(head)
            if first is None:
                raise DataError(f"{name}: not an LMDB database (data.mdb has no valid meta "
                                "page; bad magic or truncated)")
            psize = first["psize"]
            if psize < 512 or psize > 65536 or psize & (psize - 1):
                raise DataError(f"{name}: corrupt LMDB (page size {psize} in data.mdb)")
            f.seek(psize)
            second = _parse_meta(f.read(PAGE_HEADER + 136))
    except OSError as exc:
        raise DataError(f"{name}: cannot read data.mdb ({exc.strerror or exc})") from None
    metas = [m for m in (first, second) if m is not None]
    meta = max(metas, key=lambda m: m["txnid"])
    _check_meta_fields(name, meta, psize, size)


def _check_meta_fields(name: str, meta: dict, psize: int, size: int) -> None:
    if meta["version"] != LMDB_VERSION:
        raise DataError(f"{name}: unsupported LMDB data version {meta['version']} in data.mdb")
    pages_in_file = size // psize
    if meta["last_pg"] < 1 or meta["last_pg"] >= pages_in_file:
        raise DataError(f"{name}: corrupt or truncated LMDB: data.mdb holds {pages_in_file} "
                        f"pages of {psize} bytes but its meta page says the last is page "
                        f"{meta['last_pg']}")
    for root, depth in zip(meta["roots"], meta["depths"]):
        if root == INVALID_PAGE:
            continue
        if root < 2 or root > meta["last_pg"] or depth == 0 or depth > 64:
            raise DataError(f"{name}: corrupt LMDB: a tree root (page {root}, depth {depth}) "
                            "lies outside data.mdb")


def _probe_mode() -> str:
    mode = os.environ.get("CAFFE_COMPAT_DB_PROBE", "full").strip().lower()
    if mode not in ("full", "tree", "off"):
        raise DataError(f"CAFFE_COMPAT_DB_PROBE={mode!r}: expected full, tree or off")
    return mode


def _mapped_files(path: str, backend: str) -> list[Path]:
    """The files the library maps: data.mdb, or LevelDB's LOCK and table files."""
    folder = Path(path)
    if backend == "lmdb":
        return [folder / "data.mdb"]
    return [f for f in folder.iterdir() if f.suffix in (".ldb", ".sst") or f.name == "LOCK"]


def file_stamps(path: str, backend: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (device, inode, size, mtime_ns) of each file the reader maps."""
    stamps = {}
    for f in _mapped_files(path, backend):
        st = f.stat()
        stamps[f.name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return stamps


def changed_in_place(path: str, stamps: dict) -> str | None:
    """Why reading through a mapping made at ``stamps`` is unsafe now, or None.

    Only a file that is still the same inode but has another size or mtime counts: a deleted
    or replaced file stays alive behind the mapping (LevelDB's compactions delete files)."""
    for name, (dev, ino, size, mtime) in stamps.items():
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino) and (st.st_size, st.st_mtime_ns) != (size, mtime):
            change = (f"now {st.st_size} bytes, was {size}" if st.st_size != size
                      else "same size, new modification time")
            return (f"{os.path.join(path, name)}: modified in place while open ({change}); "
                    "reopen it once the writer is done (writers should build a new file "
                    "and rename it into place)")
    return None


def replaced(path: str, backend: str, stamps: dict) -> bool:
    """Whether the database at ``path`` is no longer the files a reader opened."""
    name = "data.mdb" if backend == "lmdb" else "LOCK"
    try:
        st = os.stat(os.path.join(path, name))
    except OSError:
        return True
    return (st.st_dev, st.st_ino) != stamps.get(name, (None, None, 0, 0))[:2]


def _state(path: str, backend: str) -> tuple:
    """What identifies the database's current content, and whether it changed so recently
    that a later write could leave the same identity (then a pass is not remembered)."""
    folder = Path(path)
    files = [folder / "data.mdb"] if backend == "lmdb" else sorted(folder.iterdir())
    state, newest = [os.path.realpath(path)], 0
    for f in files:
        st = f.stat()
        state.append((f.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    racy = newest > time.time_ns() - RACY_SECONDS * 1e9
    return tuple(state), racy


def probe(path: str, backend: str) -> None:
    """Walk the database in a child process; DataError naming it if the walk fails or dies."""
    if backend == "lmdb":
        check_lmdb_meta(path)
    mode = _probe_mode()
    if mode == "off":
        return
    try:
        state, racy = _state(path, backend)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the database ({exc.strerror or exc})") from None
    with _VERIFIED_LOCK:
        if state in _VERIFIED:
            return
    size = sum(entry[3] for entry in state[1:])
    full = mode == "full" and size <= FULL_PROBE_BYTES
    _run_child(path, backend, full, timeout=60 + size / 20e6)
    if not racy:
        with _VERIFIED_LOCK:
            _VERIFIED.add(state)


def _run_child(path: str, backend: str, full: bool, timeout: float) -> None:
    script = Path(__file__).with_name("db_probe.py")
    # -P: the script's folder is not put on sys.path (its modules would shadow nothing, but
    # the child needs only the standard library and lmdb/plyvel).
    cmd = [sys.executable, "-P", os.fspath(script), path, backend, "1" if full else "0"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              errors="replace")
    except subprocess.TimeoutExpired:
        raise DataError(f"{path}: reading the {backend} database did not finish in "
                        f"{timeout:.0f} s (corrupt: a cycle in its tree?)") from None
    if done.returncode == 0:
        return
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode).name
        raise DataError(f"{path}: corrupt {backend} database (reading it killed a worker "
                        f"process with {sig})")
    lines = done.stderr.strip().splitlines()
    reason = lines[-1][:300] if lines else f"exit status {done.returncode}"
    raise DataError(f"{path}: corrupt {backend} database ({reason})")
