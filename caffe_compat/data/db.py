"""LMDB and LevelDB key/value databases behind one small interface (Caffe's ``db.hpp``).

Readers are shared: every ``open_db`` of the same folder in one process reuses one open
environment (LMDB and LevelDB both forbid opening a database twice in a process), so a train
net and a test net — or several nets — can read the same source at once. LMDBs are opened
``readonly=True, lock=False``; nothing is written to them. Where the calling script itself
still has the database open (an ``lmdb.Environment`` or ``plyvel.DB`` it wrote the records
with, as Caffe-era scripts and notebooks leave them), the readers use that one and leave it
open when they finish: Caffe's C++ readers opened such databases a second time.

Writers build the database under a temporary name next to the target and rename it into
place on ``close()``, so an interrupted conversion never leaves a half-written database.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from caffe_compat.formats.atomic import commit_temporary, discard_temporary, fresh_temporary
from caffe_compat.data.db_borrow import open_environment, open_leveldb
from caffe_compat.data.db_guard import changed_in_place, file_stamps, probe, replaced
from caffe_compat.formats.errors import DataError

BACKENDS = ("lmdb", "leveldb")
COMMIT_EVERY = 1000  # convert_imageset commits a transaction every 1000 records
FEW_FILES = 16       # mapped files checked before every read; more: every RECHECK_SECONDS
RECHECK_SECONDS = 0.5


def detect_backend(path: str | os.PathLike) -> str:
    """'lmdb' or 'leveldb' from the folder's files; DataError when it is neither."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{os.fspath(path)}: database does not exist")
    if p.is_dir() and (p / "data.mdb").is_file():
        return "lmdb"
    if p.is_dir() and (p / "CURRENT").is_file():
        return "leveldb"
    raise DataError(f"{os.fspath(path)}: not an LMDB or LevelDB database "
                    "(no data.mdb or CURRENT file)")


def normalize_backend(backend) -> str:
    """Accept 'lmdb'/'leveldb' in any case, or DataParameter's enum (LEVELDB=0, LMDB=1)."""
    if isinstance(backend, int):
        return "lmdb" if backend == 1 else "leveldb"
    name = str(backend).lower()
    if name not in BACKENDS:
        raise DataError(f"unknown database backend '{backend}' (known: lmdb, leveldb)")
    return name


# ---------------------------------------------------------------------------- reading


def _stamps(path: str, backend: str) -> dict:
    try:
        return file_stamps(path, backend)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the database ({exc.strerror or exc})") from None


class _Handle:
    """One open database shared by all readers of a path in this process."""

    def __init__(self, path: str, backend: str):
        self.path, self.backend, self.refs = path, backend, 0
        self.borrowed = False        # reading through an environment the caller opened
        self._keys: list[bytes] | None = None
        self._lock = threading.Lock()
        self._checked = -math.inf        # when the files were last checked (many files)
        before = _stamps(path, backend)
        try:
            probe(path, backend)   # a corrupt database fails here, in a child, not in us
        except DataError as exc:
            # no child can open a LevelDB this process holds (its LOCK): the script's own,
            # which it wrote, is read through its handle (``_open``) unprobed
            if not (backend == "leveldb" and "LOCK" in str(exc)
                    and open_leveldb(path) is not None):
                raise
        self.env = self._open()
        self.stamps = before
        try:
            self.check()           # rewritten while it was probed: the probe proved nothing
            self.stamps = _stamps(path, backend)   # LevelDB's open adds files of its own
        except BaseException:
            self.close()
            raise

    def _open(self):
        if self.backend == "lmdb":
            import lmdb
            try:
                return lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                                 max_readers=1024, subdir=True)
            except lmdb.Error as exc:
                # py-lmdb 2.0 and later refuse an environment the process has open already
                # (a script's or notebook's own lmdb.open() that wrote it), where Caffe's C++
                # reader opened it anyway: read through that environment instead
                borrowed = open_environment(self.path) if "already open" in str(exc) \
                    else None
                if borrowed is None:
                    raise DataError(f"{self.path}: cannot open LMDB ({exc})") from None
                self.borrowed = True
                return borrowed
        import plyvel
        try:
            return plyvel.DB(self.path, create_if_missing=False)
        except plyvel.Error as exc:
            # LevelDB's LOCK refuses a second open in the process, as LMDB does: the
            # script's own plyvel.DB on the folder is read through instead
            borrowed = open_leveldb(self.path) if "already held" in str(exc) else None
            if borrowed is None:
                raise DataError(f"{self.path}: cannot open LevelDB ({exc})") from None
            self.borrowed = True
            return borrowed

    def check(self) -> None:
        """DataError when a file this handle maps was rewritten in place since it opened.

        A database of many files (a large LevelDB: one stat each) is checked at most every
        ``RECHECK_SECONDS``; a stat of each file before every batch would cost more than
        reading the batch."""
        if len(self.stamps) > FEW_FILES:
            now = time.monotonic()
            if now - self._checked < RECHECK_SECONDS:
                return
            self._checked = now
        reason = changed_in_place(self.path, self.stamps)
        if reason is not None:
            raise DataError(reason)

    def stale(self) -> bool:
        """Whether the database at the path is no longer (or no longer safely) this one."""
        return (replaced(self.path, self.backend, self.stamps)
                or changed_in_place(self.path, self.stamps) is not None)

    def keys(self) -> list[bytes]:
        with self._lock, library_errors(self.path, self.backend):
            if self._keys is None:
                self.check()
                if self.backend == "lmdb":
                    with self.env.begin() as txn:
                        self._keys = list(txn.cursor().iternext(keys=True, values=False))
                else:
                    self._keys = list(self.env.iterator(include_value=False))
            return self._keys

    def lent_still_open(self) -> bool:
        """Whether the environment (or LevelDB) borrowed from the caller is still open."""
        if self.backend == "leveldb":
            return not self.env.closed
        import lmdb
        try:
            self.env.info()
            return True
        except lmdb.Error:
            return False

    def close(self) -> None:
        if not self.borrowed:             # the script's own environment stays the script's
            self.env.close()


@contextlib.contextmanager
def library_errors(path: str, backend: str, what: str = ""):
    """Turn lmdb's and plyvel's own exceptions into one DataError line naming the database."""
    import lmdb
    import plyvel
    try:
        yield
    except (lmdb.Error, plyvel.Error) as exc:
        where = f" ({what})" if what else ""
        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"{path}: cannot read the {backend} database{where}: {reason}") from None


_HANDLES: dict[tuple[str, str], _Handle] = {}
_HANDLES_LOCK = threading.Lock()


class DBReader:
    """Read-only access to a database: keys in order, values by key, or a streaming scan."""

    def __init__(self, handle: _Handle):
        self._handle = handle
        self.path, self.backend = handle.path, handle.backend
        self._closed = False

    def keys(self) -> list[bytes]:
        """Every key in the database's (lexicographic) order; cached, shared by readers."""
        return self._handle.keys()

    def __len__(self) -> int:
        if self.backend == "lmdb" and self._handle._keys is None:
            self._handle.check()
            with library_errors(self.path, self.backend):
                return self._handle.env.stat()["entries"]
        return len(self.keys())

    def get_many(self, keys) -> list[bytes]:
        """The values of ``keys`` (one read transaction). A missing key is a DataError."""
        self._handle.check()
        with library_errors(self.path, self.backend):
            if self.backend == "lmdb":
                with self._handle.env.begin(buffers=False) as txn:
                    values = [txn.get(k) for k in keys]
            else:
                values = [self._handle.env.get(k) for k in keys]
        self._handle.check()       # rewritten during the read: the values may be torn
        for k, v in zip(keys, values):
            if v is None:
                raise DataError(f"{self.path}: key {k!r} disappeared from the database")
        return values

    def get(self, key: bytes) -> bytes:
        return self.get_many([key])[0]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Stream (key, value) pairs in key order without loading the key list."""
        self._handle.check()
        with library_errors(self.path, self.backend):
            if self.backend == "lmdb":
                with self._handle.env.begin(buffers=False) as txn:
                    yield from self._checked(txn.cursor())
            else:
                yield from self._checked(self._handle.env.iterator())

    def _checked(self, pairs, every: int = 256):
        """``pairs``, with the in-place-change check repeated every ``every`` records."""
        for i, pair in enumerate(pairs, 1):
            if i % every == 0:
                self._handle.check()
            yield pair

    def first(self) -> tuple[bytes, bytes]:
        """The first record; DataError when the database is empty."""
        for item in self.items():
            return item
        raise DataError(f"{self.path}: database is empty")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _HANDLES_LOCK:
            self._handle.refs -= 1
            if self._handle.refs == 0:
                key = (self._handle.path, self.backend)
                if _HANDLES.get(key) is self._handle:
                    del _HANDLES[key]
                self._handle.close()

    def __enter__(self) -> "DBReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def open_db(path: str | os.PathLike, backend: str | int | None = None) -> DBReader:
    """Open a database for reading (shared with other readers of the same folder).

    ``backend`` None detects it; a given backend that does not match the folder is an error
    (as in Caffe), with the fix in the message.
    """
    found = detect_backend(path)
    if backend is not None:
        wanted = normalize_backend(backend)
        if wanted != found:
            raise DataError(f"{os.fspath(path)}: is a {found} database but backend is "
                            f"{wanted} (set backend: {found.upper()})")
    key = (os.path.realpath(path), found)
    with _HANDLES_LOCK:
        handle = _HANDLES.get(key)
        if handle is not None and handle.stale():
            _refuse_second_open(handle, os.fspath(path))
            del _HANDLES[key]      # its readers keep the old files; new readers get the new
            handle = None
        elif handle is not None and handle.borrowed and not handle.lent_still_open():
            del _HANDLES[key]      # the script closed the environment it lent: open our own
            handle = None
        if handle is None:
            handle = _Handle(key[0], found)
            _HANDLES[key] = handle
        handle.refs += 1
    reader = DBReader(handle)
    reader.path = os.fspath(path)
    return reader


def _refuse_second_open(handle: _Handle, path: str) -> None:
    """A database rewritten in place cannot be opened again while a reader still maps it
    (both libraries refuse a second open of the same files): say which reader to close."""
    reason = changed_in_place(handle.path, handle.stamps)
    if reason is not None:
        raise DataError(f"{reason}; another reader in this process still has it open "
                        "(close the nets reading it first)")


# ---------------------------------------------------------------------------- writing


class DBWriter:
    """Write a new database atomically: records go to a temporary folder, renamed on close.

    Puts are committed every ``COMMIT_EVERY`` records, like convert_imageset. Use as a context
    manager: an exception inside the block removes the temporary folder.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "lmdb", overwrite: bool = False):
        self.path = Path(path)
        self.backend = normalize_backend(backend)
        if self.path.exists() and not overwrite:
            raise DataError(f"{os.fspath(path)}: already exists (remove it or choose another "
                            "name)")
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path.parent}: folder for the database does not exist or is not a folder")
        self.tmp = fresh_temporary(self.path)    # a killed writer's temporary goes first
        self.overwrite = overwrite
        self._pending: list[tuple[bytes, bytes]] = []
        self.count = 0
        self._env = None
        with self._write_errors():
            if self.backend == "lmdb":
                import lmdb
                self._map_size = 1 << 24
                self._env = lmdb.open(os.fspath(self.tmp), map_size=self._map_size, subdir=True)
            else:
                import plyvel
                self.tmp.mkdir()
                self._env = plyvel.DB(os.fspath(self.tmp), create_if_missing=True,
                                      error_if_exists=False, write_buffer_size=64 << 20)

    @contextlib.contextmanager
    def _write_errors(self):
        """A failed write (read-only folder, full disk) removes the temporary database and
        becomes one DataError line naming the database."""
        import lmdb
        import plyvel
        try:
            yield
        except (lmdb.Error, plyvel.Error, OSError) as exc:
            self.abort()
            reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
            raise DataError(f"{os.fspath(self.path)}: cannot write the {self.backend} "
                            f"database ({reason}); nothing was left behind") from None

    def put(self, key: bytes | str, value: bytes) -> None:
        if isinstance(key, str):
            key = key.encode()
        self._pending.append((key, value))
        self.count += 1
        if len(self._pending) >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        """Write the pending records in one transaction (LMDB grows its map as Caffe does)."""
        if not self._pending:
            return
        with self._write_errors():
            self._commit_pending()

    def _commit_pending(self) -> None:
        if self.backend == "lmdb":
            import lmdb
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        for k, v in self._pending:
                            txn.put(k, v)
                    break
                except lmdb.MapFullError:
                    self._map_size *= 2
                    self._env.set_mapsize(self._map_size)
        else:
            with self._env.write_batch() as batch:
                for k, v in self._pending:
                    batch.put(k, v)
        self._pending.clear()

    def close(self) -> None:
        """Commit, close and move the finished database to its final name."""
        self.commit()
        with self._write_errors():
            self._env.close()
            commit_temporary(self.tmp, self.path, is_dir=True)

    def abort(self) -> None:
        """Throw the partial database away."""
        try:
            if self._env is not None:
                self._env.close()
        except Exception:   # a failing environment must not keep the temporary alive
            pass
        finally:
            discard_temporary(self.tmp)

    def __enter__(self) -> "DBWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
