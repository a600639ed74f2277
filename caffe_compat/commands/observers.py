"""Subscribers to the solver's events: metrics file, live plot, TensorBoard, snapshot record.

Each is attached with ``observer.attach(solver)`` and released with ``close()``; none of them
touches the loop. The glog-format log needs no subscriber: the solver logs through
``logging`` (``caffe_compat.formats.glog``) and the command adds the log file as a handler.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from caffe_compat.commands.plot import Curves, plot_curves
from caffe_compat.engine.solver.events import (IterationDone, RunFinished, SnapshotWritten,
                                               TestDone)

log = logging.getLogger(__name__)


def _scalars(values: dict[str, list[float]]) -> dict[str, float]:
    """Outputs with one element by name; multi-element outputs as name_0, name_1, ..."""
    out = {}
    for name, vs in values.items():
        if len(vs) == 1:
            out[name] = vs[0]
        else:
            out.update({f"{name}_{i}": v for i, v in enumerate(vs)})
    return out


class Observer:
    """Base: subscribe ``on_event`` to the solver; ``close()`` unsubscribes."""

    kinds: tuple[type, ...] = ()

    def attach(self, solver) -> "Observer":
        self._solver = solver
        solver.subscribe(self.on_event, *self.kinds)
        return self

    def on_event(self, event) -> None:
        raise NotImplementedError

    def close(self) -> None:
        solver = getattr(self, "_solver", None)
        if solver is not None:
            solver.events.unsubscribe(self.on_event)
            self._solver = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SnapshotRecord(Observer):
    """The (caffemodel, solverstate) pairs written during the run, in order."""
    kinds = (SnapshotWritten,)

    def __init__(self):
        self.snapshots: list[tuple[str, str]] = []

    def on_event(self, event: SnapshotWritten) -> None:
        self.snapshots.append((event.model, event.state))


class LastTests(Observer):
    """The last TestDone of each test net (for a run's summary)."""
    kinds = (TestDone,)

    def __init__(self):
        self.last: dict[int, TestDone] = {}

    def on_event(self, event: TestDone) -> None:
        self.last[event.net_id] = event


class MetricsFile(Observer):
    """One JSON object per line: every iteration and every test (``kind`` says which).

    Appends. Each run opens with a ``{"kind": "run", "run": k, "resumed": ...}`` line: a
    resumed run continues run k of the run it resumes, any other run starts run k + 1, so
    rows of unrelated runs over one prefix are told apart (rows before the first such line
    belong to run 1).
    """
    kinds = (IterationDone, TestDone, SnapshotWritten)

    def __init__(self, path: str, resumed: bool | None = None, start_iter: int = 0):
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        if resumed is not None:
            last = _last_run(path)
            run = max(last, 1) if resumed else last + 1
            self._write({"kind": "run", "run": run, "resumed": resumed, "iter": start_iter,
                         "pid": os.getpid(), "started": round(time.time(), 3)})

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def on_event(self, event) -> None:
        if isinstance(event, IterationDone):
            row = {"kind": "train", "iter": event.iter, "loss": event.loss,
                   "smoothed_loss": event.smoothed_loss, "lr": event.lr,
                   "seconds": event.seconds,
                   "images_per_second": event.images / event.seconds if event.seconds else None,
                   "outputs": _scalars(event.outputs)}
        elif isinstance(event, TestDone):
            row = {"kind": "test", "iter": event.iter, "net": event.net_id,
                   "loss": event.loss, "seconds": event.seconds,
                   "outputs": _scalars(event.scores)}
        else:
            row = {"kind": "snapshot", "iter": event.iter, "model": event.model,
                   "state": event.state}
        self._write(row)

    def close(self) -> None:
        super().close()
        if not self._file.closed:
            self._file.close()


def _last_run(path: str) -> int:
    """The number of the last run in a metrics file (1 for rows written before runs were
    numbered, 0 for an empty or missing file)."""
    last, rows = 0, False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                rows = True
                if line.startswith('{"kind": "run"'):
                    with contextlib.suppress(ValueError, TypeError):
                        last = int(json.loads(line)["run"])
    except OSError:
        return 0
    return last or int(rows)


class LivePlot(Observer):
    """Collects the curves from the events and redraws the PNG at every test and at the end."""
    kinds = (IterationDone, TestDone, RunFinished)

    def __init__(self, path: str, title: str | None = None, curves: Curves | None = None):
        self.path, self.title = path, title
        self.curves = curves or Curves()
        self.drawn: str | None = None

    def on_event(self, event) -> None:
        if isinstance(event, IterationDone):
            self.curves.loss_weights.update(event.loss_weights)
            self.curves.smoothed_loss.append((event.iter, event.smoothed_loss))
            for name, value in _scalars(event.outputs).items():
                self.curves.add_train(event.iter, name, value)
            return
        if isinstance(event, TestDone):
            self.curves.loss_weights.update(event.loss_weights)
            for name, value in _scalars(event.scores).items():
                self.curves.add_test(event.iter, event.net_id, name, value)
        self.draw()

    def draw(self) -> str | None:
        try:
            self.drawn = plot_curves(self.curves, self.path, self.title)
        except Exception as exc:  # noqa: BLE001 - a failed plot must not stop training
            log.warning(f"could not draw {self.path}: {exc}")
        return self.drawn


class TensorBoard(Observer):
    """Scalars of every train/test output, lr and images/s; weight histograms per snapshot."""
    kinds = (IterationDone, TestDone, SnapshotWritten)

    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("--tensorboard needs the 'tensorboard' package: "
                               "pip install tensorboard") from exc
        os.makedirs(logdir, exist_ok=True)
        self.writer = SummaryWriter(logdir)

    def on_event(self, event) -> None:
        w = self.writer
        if isinstance(event, IterationDone):
            for name, value in _scalars(event.outputs).items():
                w.add_scalar(f"train/{name}", value, event.iter)
            w.add_scalar("train/smoothed_loss", event.smoothed_loss, event.iter)
            w.add_scalar("train/lr", event.lr, event.iter)
            if event.seconds:
                w.add_scalar("train/images_per_second", event.images / event.seconds, event.iter)
        elif isinstance(event, TestDone):
            for name, value in _scalars(event.scores).items():
                w.add_scalar(f"test{event.net_id}/{name}", value, event.iter)
        elif self._solver is not None:
            for lp in self._solver.train_module.learnable_params:
                w.add_histogram(f"weights/{lp.name}", lp.tensor.detach().float().cpu(),
                                event.iter)
        w.flush()

    def close(self) -> None:
        super().close()
        self.writer.close()
