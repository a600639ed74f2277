"""One training run per ``snapshot_prefix``: a lock file beside the snapshots.

Two runs writing the same prefix would interleave one log, repeat metrics and silently
replace each other's ``_iter_N`` snapshots (a later resume would then continue the wrong
run). ``caffe train`` therefore holds ``<prefix>.lock`` (``<prefix>train.lock`` for a prefix
naming a folder) while it runs. The file says who holds it: pid, host and start time, one
``key=value`` per line. A second run is refused with a message naming the first. A lock left
by a run that was killed (its pid is gone on this host) is stale: the next run takes it over
and says so. A lock held from another host cannot be checked from here and is never taken
over; the message names the file to delete once that run is known to be gone.

    with PrefixLock("snap/net"):
        ...train...
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from caffe_compat.formats.atomic import process_alive
from caffe_compat.formats.errors import CaffeCompatError

log = logging.getLogger(__name__)


class PrefixBusy(CaffeCompatError):
    """Another live run holds the snapshot prefix."""


def lock_path_for(prefix: str) -> Path:
    """``<prefix>.lock``; a prefix naming a folder (``snap/``) gives ``snap/train.lock``."""
    return Path(prefix + ("train.lock" if prefix.endswith(("/", os.sep)) else ".lock"))


def read_owner(path: Path) -> dict[str, str]:
    """The ``key=value`` lines of a lock file ({} when unreadable or being written)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _describe(owner: dict[str, str]) -> str:
    started = owner.get("started", "")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) \
        if started.replace(".", "", 1).isdigit() else "an unknown time"
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}"
            + (f" ({owner['command']})" if owner.get("command") else ""))


def _process_start(pid: int | str) -> str:
    """The kernel's start time of ``pid`` (Linux /proc; "" elsewhere): tells a reused pid
    from the process that wrote the lock."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _is_stale(owner: dict[str, str], path: Path) -> bool:
    """A lock of this host whose process is gone (or whose pid now belongs to a process
    started later), or an empty lock file older than a few seconds (its writer died
    between creating and filling it). Another host's lock is never stale here."""
    if not owner:
        try:
            return time.time() - path.stat().st_mtime > 5
        except OSError:
            return True
    pid = owner.get("pid", "")
    if owner.get("host") != socket.gethostname() or not pid.isdigit():
        return False
    if not process_alive(int(pid)):
        return True
    return bool(owner.get("pid_start")) and _process_start(pid) != owner["pid_start"]


class PrefixLock:
    """Hold the lock of ``prefix`` (``acquire``/``release`` or a ``with`` block)."""

    def __init__(self, prefix: str, command: str = "caffe train", warn=None):
        self.path = lock_path_for(prefix)
        self.prefix = prefix
        self.command = command
        self.warn = warn or log.warning      # where "taking over a stale lock" is said
        self.held = False

    def acquire(self) -> "PrefixLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):          # a second try only after removing a stale lock
            if self._create():
                self.held = True
                return self
            owner = read_owner(self.path)
            if not owner and self.path.exists():
                time.sleep(0.2)             # being written by its owner this instant
                owner = read_owner(self.path)
            if not _is_stale(owner, self.path):
                raise PrefixBusy(
                    f"snapshot_prefix '{self.prefix}' is in use by another run ("
                    f"{_describe(owner)}; lock file {self.path}): two runs would mix their "
                    "logs and replace each other's snapshots. Wait for it, stop it, or give "
                    "this run another snapshot_prefix (delete the lock file only if that run "
                    "is gone)")
            self.warn(f"taking over {self.path}: its run ({_describe(owner)}) is no longer "
                      "running")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise PrefixBusy(f"snapshot_prefix '{self.prefix}': another run took the lock "
                         f"{self.path} at the same moment ({_describe(read_owner(self.path))})")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
                    f"started={time.time():.3f}\ncommand={self.command}\n"
                    f"pid_start={_process_start(os.getpid())}\n")
        return True

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if self.held and read_owner(self.path).get("pid") == str(os.getpid()):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self) -> "PrefixLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["PrefixLock", "PrefixBusy", "lock_path_for", "read_owner"]
