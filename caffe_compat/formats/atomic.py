"""The one way every writer in caffe-compat puts a file (or folder) under its final name.

A reader never sees a partial file: the content goes to a hidden temporary name in the same
folder (so the rename cannot cross filesystems), is flushed and fsync'd, and is renamed over
the final name only when complete. On any failure, Ctrl-C included, the temporary is removed
and the final name keeps its previous content. A writer killed outright (SIGKILL, power loss)
leaves only a temporary, which the next write of the same output removes (``fresh_temporary``;
only temporaries whose writing process is gone), as ``remove_stale_temporaries`` does for a
whole snapshot folder at the start of a run.

    with atomic_write("net_iter_100.caffemodel", "wb") as f:
        f.write(data)

    with atomic_path("out.h5") as tmp:        # for libraries that want a path (h5py, lmdb)
        h5py.File(tmp, "w").close()
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger(__name__)
TEMP_MARK = ".tmp-"   # every temporary is named ".<final name>.tmp-<pid>-<random>"


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden, unique name beside ``path`` that marks its content as incomplete."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fresh_temporary(path: str | os.PathLike) -> Path:
    """A new temporary for ``path``, after removing the temporaries that killed writers of
    the same output left (only those whose process is gone; each removal is logged)."""
    path = Path(path)
    for stale in remove_stale_temporaries(path.parent, path.name, exact=True):
        log.warning("removed %s, a temporary of %s left by a writer that was killed",
                    stale, path)
    return temporary_name(path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (file or folder).

    A folder that exists under the final name is replaced whole (moved aside, then removed),
    so a database rebuilt in place is never half old, half new.
    """
    final = Path(path)
    tmp = fresh_temporary(final)
    try:
        yield tmp
        commit_temporary(tmp, final, is_dir)
    except BaseException:
        _remove(tmp)
        raise


def commit_temporary(tmp: Path, final: Path, is_dir: bool = False) -> None:
    """Rename a finished temporary over ``final`` (a folder is swapped whole)."""
    if not tmp.exists():
        raise FileNotFoundError(f"nothing was written to the temporary for {final}")
    if is_dir and final.is_dir() and not final.is_symlink():
        old = temporary_name(final)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)
    _fsync_folder(final.parent)


def discard_temporary(tmp: Path) -> None:
    """Remove a temporary file or folder (a failed or aborted write)."""
    _remove(Path(tmp))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w",
                 encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary for writing (``"w"`` text, ``"wb"`` bytes); rename it when closed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": encoding or "utf-8"}
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def remove_stale_temporaries(folder: str | os.PathLike, final_name: str = "",
                             exact: bool = False) -> list[Path]:
    """Delete temporaries that a killed writer left in ``folder`` (for ``final_name*`` only,
    when given; for ``final_name`` itself with ``exact``) whose process is gone; returns what
    was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    start = f".{final_name}{TEMP_MARK}" if exact else f".{final_name}"
    for entry in folder.iterdir():
        name = entry.name
        if not name.startswith(start) or TEMP_MARK not in name:
            continue
        pid_part = name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if pid_part.isdigit() and process_alive(int(pid_part)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):    # gone, or no pid at all
        return False
    except PermissionError:
        return True
    return True


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """``fig.savefig`` through a temporary (the format comes from the final name's suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = savefig_kwargs.pop("format", None) or path.suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)
    return path
