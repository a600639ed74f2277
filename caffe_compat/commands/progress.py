"""A tqdm progress bar for training, shown only when stderr is a terminal.

It shows iterations done / max_iter, the smoothed loss, the last test accuracy and images per
second (train batch × iter_size per iteration), from the solver's events. While it is open,
the terminal copy of each log line goes through ``tqdm.write``, so log lines and the bar never
share a line; log files are unaffected.
"""
from __future__ import annotations

import sys
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
    """``attach(solver)`` subscribes to its events and routes the log through tqdm."""
    kinds = (RunStarted, IterationDone, TestDone)

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None,
                 file: TextIO | None = None, smoothing: float = 0.1):
        self.file = file or sys.stderr
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.total, self.initial = total, initial
        self.smoothing = smoothing
        self.bar = None
        self._rate: float | None = None
        self._accuracy: float | None = None

    def attach(self, solver) -> "TrainProgress":
        if not self.enabled:
            return self
        from tqdm import tqdm
        self.bar = tqdm(total=self.total, initial=solver.iter, file=self.file, unit="it",
                        dynamic_ncols=True, leave=True, desc="train")
        glog.set_echo(self._write)
        super().attach(solver)
        return self

    def _write(self, line: str) -> None:
        self.bar.write(line, file=self.file)

    def on_event(self, event) -> None:
        if self.bar is None:
            return
        if isinstance(event, TestDone):
            if event.net_id == 0:
                self._accuracy = accuracy_of(event)
            return
        if isinstance(event, RunStarted):
            self.bar.update(event.iter - self.bar.n)
            return
        if event.seconds > 0:
            rate = event.images / event.seconds
            self._rate = rate if self._rate is None else \
                self.smoothing * rate + (1 - self.smoothing) * self._rate
        info = {"loss": f"{event.smoothed_loss:.4g}"}
        if self._accuracy is not None:
            info["acc"] = f"{self._accuracy:.4g}"
        if self._rate is not None:
            info["img/s"] = f"{self._rate:.1f}"
        self.bar.set_postfix(info, refresh=False)
        self.bar.update(event.iter - self.bar.n)

    def close(self) -> None:
        if self.bar is None:
            return
        glog.set_echo(None)
        super().close()
        self.bar.close()
        self.bar = None


__all__ = ["TrainProgress", "accuracy_of"]
