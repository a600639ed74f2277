"""Background batch prefetching: worker threads produce batches ahead of the consumer.

Batch ``k`` is ``produce(k)``, a pure function of ``k`` (its random draws are seeded from
``k``), so results do not depend on how many workers run or in which order they finish.
Workers stay at most ``depth`` batches ahead. Decoding (OpenCV, numpy, LMDB reads) releases
the GIL, so threads overlap with each other and with the training step.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable


JOIN_SECONDS = 60.0   # close() waits this long for a worker's batch in progress


def default_workers(depth: int) -> int:
    """Worker threads: $CAFFE_COMPAT_DATA_WORKERS, else half the cores (1..4), at most depth."""
    env = os.environ.get("CAFFE_COMPAT_DATA_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(depth, 4, (os.cpu_count() or 2) // 2))


class Prefetcher:
    """Yields ``produce(0), produce(1), ...`` in order, computed by background threads."""

    def __init__(self, produce: Callable[[int], Any], depth: int = 4, workers: int | None = None,
                 name: str = "prefetch", start: int = 0,
                 on_exit: Callable[[], None] | None = None):
        """``on_exit`` runs once the last worker has stopped after ``close()`` (the place to
        close the database the workers read, never under their feet)."""
        self._produce = produce
        self._on_exit = on_exit
        self._depth = max(1, depth)
        self._cond = threading.Condition()
        self._next_make = self._next_take = start
        self._ready: dict[int, tuple[bool, Any]] = {}
        self._closed = False
        self.wait_seconds = 0.0      # time next() spent waiting for a batch
        n = workers or default_workers(self._depth)
        self._alive = n
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                self._alive -= 1
                last = self._alive == 0
            if last and self._on_exit is not None:
                self._on_exit()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._next_make >= self._next_take + self._depth:
                    self._cond.wait()
                if self._closed:
                    return
                k = self._next_make
                self._next_make += 1
            try:
                result = (True, self._produce(k))
            except BaseException as exc:  # handed to the consumer, raised there
                result = (False, exc)
            with self._cond:
                if k >= self._next_take:     # a batch from before a seek() is not wanted
                    self._ready[k] = result
                self._cond.notify_all()

    def next(self) -> Any:
        """The next batch in order; re-raises a worker's exception for that batch."""
        start = time.perf_counter()
        with self._cond:
            k = self._next_take
            while k not in self._ready:
                if self._closed:
                    raise RuntimeError("prefetcher is closed")
                self._cond.wait()
            ok, value = self._ready.pop(k)
            self._next_take += 1
            self._cond.notify_all()
        self.wait_seconds += time.perf_counter() - start
        if not ok:
            raise value
        return value

    def seek(self, position: int) -> None:
        """Continue from batch ``position`` (a resumed run picks up its data where it was)."""
        with self._cond:
            self._ready.clear()
            self._next_make = self._next_take = int(position)
            self._cond.notify_all()

    @property
    def position(self) -> int:
        """Index of the batch ``next()`` returns next."""
        return self._next_take

    def close(self, timeout: float = JOIN_SECONDS) -> None:
        """Stop the workers and wait (up to ``timeout`` s) for the batch each is making, so
        the caller may change or delete the files they read once this returns."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():   # the finalizer may run on a worker
                t.join(max(0.0, deadline - time.monotonic()))
