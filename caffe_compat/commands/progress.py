"""Training progress: a tqdm bar on a terminal, progress lines in the log otherwise.

The bar shows iterations done / max_iter, the smoothed loss, the last test accuracy and
images per second. While it is open, the terminal copy of each log line goes through
``tqdm.write``, so log lines and the bar never share a line; log files are unaffected.

Without a terminal (a log file, ``make train`` piped, a batch job) a line goes to the log at
each display interval (every 5% of the run when ``display`` is 0):
``Progress: iteration 200/10000 (2.0%), 136.2 images/s, elapsed 0:01:10, ETA 0:57:12``.

Images per second count every image the solver reads: iterations × batch × iter_size
(``images_per_iter`` of the solver's events), over wall-clock time, tests and snapshots
included — the pace that the ETA extrapolates.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from caffe_compat.commands.observers import Observer
from caffe_compat.engine.solver.events import IterationDone, RunStarted, TestDone
from caffe_compat.formats import glog


def accuracy_of(event: TestDone) -> float | None:
    """The first accuracy-like scalar output (name containing 'acc') of a test."""
    for name in event.scores:
        if "acc" in name.lower():
            return event.scalar(name)
    return None


class TrainProgress(Observer):
    """``attach(solver)`` subscribes to its events: a bar (the log routed through tqdm) when
    ``enabled`` (default: on a terminal), progress lines in the log otherwise."""
    kinds = (RunStarted, IterationDone, TestDone)

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None,
                 file: TextIO | None = None, smoothing: float = 0.1, clock=time.monotonic):
        self.file = file or sys.stderr
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.total, self.initial = total, initial
        self.smoothing = smoothing
        self.bar = None
        self.pace = Pace(total, clock)
        self._per_iter: float | None = None   # wall-clock seconds per iteration, smoothed
        self._since = (0.0, 0)             # (time, iteration) of the last bar update
        self.every = 0            # log a progress line every this many iterations (no bar)
        self._accuracy: float | None = None

    def attach(self, solver) -> "TrainProgress":
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=solver.iter, file=self.file, unit="it",
                            dynamic_ncols=True, leave=True, desc="train")
            glog.set_echo(self._write)
        else:
            display = getattr(getattr(solver, "param", None), "display", 0)
            self.every = display if display > 0 else max(1, self.total // 20)
        super().attach(solver)
        return self

    def _write(self, line: str) -> None:
        self.bar.write(line, file=self.file)

    def on_event(self, event) -> None:
        if isinstance(event, TestDone):
            if event.net_id == 0:
                self._accuracy = accuracy_of(event)
            return
        if isinstance(event, RunStarted):
            self.pace.start(event.iter, event.images_per_iter)
            self._since = (self.pace.clock(), event.iter)
            if self.bar is not None:
                self.bar.update(event.iter - self.bar.n)
            return
        if self.bar is not None:
            self._show(event)
        elif event.iter % self.every == 0 or event.iter == self.total:
            glog.info(self.pace.line(event.iter), "progress.py:1")

    def _show(self, event) -> None:
        info = {"loss": f"{event.smoothed_loss:.4g}"}
        if self._accuracy is not None:
            info["acc"] = f"{self._accuracy:.4g}"
        now, (then, last_iter) = self.pace.clock(), self._since
        if now > then and event.iter > last_iter:   # wall clock, tests and snapshots included
            per_iter = (now - then) / (event.iter - last_iter)
            self._per_iter = per_iter if self._per_iter is None else \
                self.smoothing * per_iter + (1 - self.smoothing) * self._per_iter
            self._since = (now, event.iter)
        if self._per_iter:             # time is averaged, not rates (a mean of rates runs high)
            info["img/s"] = f"{self.pace.images_per_iter / self._per_iter:.1f}"
        self.bar.set_postfix(info, refresh=False)
        self.bar.update(event.iter - self.bar.n)

    def close(self) -> None:
        if self.bar is None:
            super().close()
            return
        glog.set_echo(None)
        super().close()
        self.bar.close()
        self.bar = None


class Pace:
    """Iterations, images/s and the ETA of a run, from wall-clock time between lines."""

    def __init__(self, total: int, clock=time.monotonic):
        self.total, self.clock = total, clock
        self.images_per_iter = 1
        self.first_iter = self.last_iter = 0
        self.started = self.last_time = clock()

    def start(self, iteration: int, images_per_iter: int) -> None:
        self.images_per_iter = max(1, int(images_per_iter))
        self.first_iter = self.last_iter = iteration
        self.started = self.last_time = self.clock()

    def line(self, iteration: int) -> str:
        """The progress line at ``iteration``; images/s over the span since the last line."""
        now = self.clock()
        span, iters = now - self.last_time, iteration - self.last_iter
        rate = iters * self.images_per_iter / span if span > 0 else 0.0
        elapsed, done = now - self.started, iteration - self.first_iter
        left = max(self.total - iteration, 0)
        eta = _clock(elapsed / done * left) if done > 0 else "unknown"
        self.last_time, self.last_iter = now, iteration
        share = f" ({100.0 * iteration / self.total:.1f}%)" if self.total > 0 else ""
        return (f"Progress: iteration {iteration}/{self.total}{share}, {rate:.1f} images/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


__all__ = ["TrainProgress", "Pace", "accuracy_of"]
