"""Child processes that do the work: ``caffe dataset`` builds and ``caffe fit`` runs.

Training goes through ``caffe fit`` (the solver engine's one loop) in its own process, so a
crash or a stuck step never takes the server down. A thread per child waits for it and records
its fate: exit 0 → ``ready``/``done`` (``stopped`` when a stop was asked), else ``failed`` with
the command's own one-line error. Stop = SIGINT, which ``caffe fit`` answers with a snapshot
(Caffe's ``--sigint_effect stop``). Training jobs beyond ``concurrent_jobs`` wait ``queued``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import caffe_compat
from caffe_compat.dashboard.settings import Settings
from caffe_compat.dashboard.store import Store

CAFFE = [sys.executable, "-m", "caffe_compat.commands.caffe_main"]
WORKER_LOG = "worker.log"


def child_env(settings: Settings) -> dict:
    """The server's environment, this package first on the path, Python layers per setting."""
    env = dict(os.environ)
    package_parent = str(Path(caffe_compat.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env["CAFFE_COMPAT_PYTHON_LAYERS"] = "allow" if settings.allow_python_layers else "refuse"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def last_error(log: Path) -> str:
    """The command's one-line error from its log (the last ``error:`` line, else the last)."""
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "the worker left no log"
    errors = [l for l in lines if "error:" in l]
    return (errors or lines or ["the worker exited without a message"])[-1][-500:]


def is_our_worker(pid: int) -> bool:
    """Whether ``pid`` still runs one of our ``caffe`` children (a PID can be reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return CAFFE[1:3] == [a.decode(errors="replace") for a in cmdline[1:3]] and \
        b"caffe_compat.commands.caffe_main" in cmdline


def stop_orphans(pids: list[int], wait: float = 60.0) -> list[int]:
    """SIGINT the children a killed server left behind (they run in their own session, so
    they outlive it): each snapshots and stops before the new server resumes it."""
    import time
    stopped = [pid for pid in pids if is_our_worker(pid)]
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while any(is_our_worker(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in stopped:
        if is_our_worker(pid):
            os.kill(pid, signal.SIGKILL)
    return stopped


class Workers:
    """Start, watch, stop and queue the children of one server."""

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._procs: dict[tuple[str, int], subprocess.Popen] = {}
        self._stopping: set[int] = set()
        self._lock = threading.Lock()
        self._closing = False          # server exit: records say interrupted, not the exit code
        self._waiters: set[threading.Thread] = set()   # joined at shutdown, before the store
        self.after_exit = None         # called after each child's exit (the job queue)

    # -- starting ---------------------------------------------------------------------------
    def run(self, table: str, ident: int, argv: list[str], cwd: Path,
            on_success: str, result_of=None) -> None:
        """Spawn ``caffe <argv>`` for a record; its output goes to ``cwd/worker.log``.

        On exit 0 the record gets state ``on_success`` together with ``result_of()`` (read
        before the state changes, so a reader never sees the state without its result; an
        exception there fails the record); ``after_exit()`` runs after every exit."""
        with self._lock:
            if self._closing:          # the server is stopping: the record stays as it is
                return
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(cwd / WORKER_LOG, "ab")
        try:
            proc = subprocess.Popen(CAFFE + argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=child_env(self.settings),
                                    start_new_session=True)
        except OSError as exc:
            self.store.update(table, ident, state="failed", error=f"could not start: {exc}")
            return
        finally:
            log.close()
        self.store.update(table, ident, state="running", pid=proc.pid, error=None)
        waiter = threading.Thread(target=self._wait,
                                  args=(table, ident, proc, cwd, on_success, result_of),
                                  daemon=True, name=f"{table}-{ident}")
        with self._lock:
            self._procs[(table, ident)] = proc
            self._waiters.add(waiter)
        waiter.start()

    def _wait(self, table, ident, proc, cwd, on_success, result_of) -> None:
        try:
            self._record_exit(table, ident, proc, cwd, on_success, result_of)
        finally:
            with self._lock:
                self._waiters.discard(threading.current_thread())

    def _record_exit(self, table, ident, proc, cwd, on_success, result_of) -> None:
        code = proc.wait()
        with self._lock:
            self._procs.pop((table, ident), None)
            stopped = ident in self._stopping and table == "jobs"
            self._stopping.discard(ident)
            if self._closing:
                return
        if code == 0:
            try:
                result = result_of() if result_of is not None else {}
            except (OSError, ValueError) as exc:
                self.store.update(table, ident, state="failed", pid=None, error=str(exc))
            else:
                self.store.update(table, ident, state="stopped" if stopped else on_success,
                                  pid=None, result=result)
        elif stopped and code in (130, -signal.SIGINT):
            self.store.update(table, ident, state="stopped", pid=None)
        else:
            self.store.update(table, ident, state="failed", pid=None,
                              error=f"exit status {code}: {last_error(cwd / WORKER_LOG)}")
        with self._lock:
            closing = self._closing
        if self.after_exit is not None and not closing:
            self.after_exit()

    # -- stopping ---------------------------------------------------------------------------
    def running(self, table: str, ident: int) -> bool:
        with self._lock:
            return (table, ident) in self._procs

    def stop(self, table: str, ident: int) -> bool:
        """SIGINT the child (it snapshots, then stops); False if it is not running."""
        with self._lock:
            proc = self._procs.get((table, ident))
            if proc is None:
                return False
            self._stopping.add(ident)
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    def shutdown(self, wait: float = 60.0) -> None:
        """Server exit: every running job is asked to snapshot and stop; those still alive
        after ``wait`` seconds are killed. Their records read ``interrupted`` (resumable).
        Returns once every waiter thread has finished with the store (the caller closes it
        next; a waiter still writing would meet a closed database)."""
        with self._lock:
            procs = dict(self._procs)
            self._closing = True
        for (table, ident), proc in procs.items():
            self.store.update(table, ident, state="interrupted" if table == "jobs" else "failed",
                              error="the dashboard stopped while this was running")
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        for proc in procs.values():
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for (table, ident) in procs:
            self.store.update(table, ident, pid=None, state="interrupted" if table == "jobs"
                              else "failed")
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.join(timeout=wait)


__all__ = ["Workers", "child_env", "last_error", "stop_orphans", "is_our_worker", "CAFFE",
           "WORKER_LOG"]
