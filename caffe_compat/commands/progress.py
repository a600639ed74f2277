"""A tqdm progress bar for training, shown only when stderr is a terminal.

It shows iterations done / max_iter, the smoothed loss, the last test accuracy and images per
second (train batch × iter_size per iteration). While it is open, glog's terminal copy of each
log line goes through ``tqdm.write``, so log lines and the bar never share a line; log files
are unaffected.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from caffe_compat.formats import glog


def images_per_iteration(solver) -> int:
    """Batch size of the train net's first source blob (Data/Input/...) × iter_size."""
    module = solver.train_module
    for name in module.layer_names:
        if not module.bottom_names[name] and module.top_names[name]:
            shape = module.blob_shapes.get(module.top_names[name][0]) or (1,)
            return int(shape[0] if shape else 1) * solver.param.iter_size
    return solver.param.iter_size


def last_test_accuracy(solver) -> float | None:
    """The first accuracy-like output (name containing 'acc') of test net #0's last round."""
    if not solver.test_modules or not solver.mean_scores[0]:
        return None
    module = solver.test_modules[0]
    k = 0
    for name in module.output_names:
        count = math.prod(module.blob_shapes.get(name, ()))
        if "acc" in name.lower():
            return solver.mean_scores[0][k] if k < len(solver.mean_scores[0]) else None
        k += count
    return None


class TrainProgress:
    """``attach(solver)`` adds an iteration hook and routes glog through tqdm; ``close()``."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None,
                 file: TextIO | None = None, smoothing: float = 0.1):
        self.file = file or sys.stderr
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.total, self.initial = total, initial
        self.smoothing = smoothing
        self.bar = None
        self._images = 1
        self._last: tuple[float, int] | None = None
        self._rate: float | None = None
        self._solver = None

    def attach(self, solver) -> "TrainProgress":
        if not self.enabled:
            return self
        from tqdm import tqdm
        self._solver = solver
        self._images = images_per_iteration(solver)
        self.bar = tqdm(total=self.total, initial=solver.iter, file=self.file, unit="it",
                        dynamic_ncols=True, leave=True, desc="train")
        self._last = (time.perf_counter(), solver.iter)
        solver.iteration_hooks.append(self.update)
        glog.set_echo(self._write)
        return self

    def _write(self, line: str) -> None:
        self.bar.write(line, file=self.file)

    def update(self, solver) -> None:
        """Iteration hook: advance the bar to ``solver.iter`` and refresh its numbers."""
        if self.bar is None:
            return
        now = time.perf_counter()
        then, it0 = self._last
        if solver.iter > it0 and now > then:
            rate = (solver.iter - it0) * self._images / (now - then)
            self._rate = rate if self._rate is None else \
                self.smoothing * rate + (1 - self.smoothing) * self._rate
        self._last = (now, solver.iter)
        info = {"loss": f"{solver.smoothed_loss:.4g}"}
        acc = last_test_accuracy(solver)
        if acc is not None:
            info["acc"] = f"{acc:.4g}"
        if self._rate is not None:
            info["img/s"] = f"{self._rate:.1f}"
        self.bar.set_postfix(info, refresh=False)
        self.bar.update(solver.iter - self.bar.n)

    def close(self) -> None:
        if self.bar is None:
            return
        glog.set_echo(None)
        if self._solver is not None and self.update in self._solver.iteration_hooks:
            self._solver.iteration_hooks.remove(self.update)
        self.bar.close()
        self.bar = None

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["TrainProgress", "images_per_iteration", "last_test_accuracy"]
