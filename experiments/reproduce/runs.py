"""Training one (model, seed) run of the protocol on the solver engine, resumably.

The engine runs the loop with the protocol's schedule (a test and a snapshot every epoch);
``EpochRecorder`` observes its events and turns each epoch into a record, and ``RunState``
keeps what a killed run needs to continue: the last epoch snapshot, the RNG state and the
records so far.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from google.protobuf import text_format

from caffe_compat.engine.solver.events import IterationDone, SnapshotWritten, TestDone
from caffe_compat.proto import caffe_pb2
from experiments.reproduce.protocol import (ProtocolError, RunPlan, plan_run, solver_summary,
                                            write_json)


class RunState:
    """The in-progress files of one run: ``state.json``, the last snapshot and RNG state."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "state.json"

    def load(self, key: dict) -> dict | None:
        if not self.path.is_file():
            return None
        state = json.loads(self.path.read_text(encoding="utf-8"))
        if state.get("key") != key:     # another protocol (epochs, solver, net): start afresh
            self.clear()
            return None
        return state

    def save(self, snapshot: SnapshotWritten, key: dict, records: list[dict],
             previous: dict | None, pending: dict | None = None) -> dict:
        """Record the snapshot just written, the records of the epochs before it and the
        epoch whose test is still to come (``pending``: its train losses)."""
        rng = self.folder / f"rng_iter_{snapshot.iter}.pt"
        torch.save(torch.get_rng_state(), rng)
        state = {"key": key, "epoch": len(records), "iter": snapshot.iter,
                 "solverstate": os.path.basename(snapshot.state), "rng": rng.name,
                 "records": list(records), "pending": pending}
        write_json(self.path, state)
        if previous and previous["solverstate"] != state["solverstate"]:
            for name in (previous["solverstate"], previous["rng"],
                         previous["solverstate"].replace(".solverstate", ".caffemodel")):
                (self.folder / name).unlink(missing_ok=True)
        return state

    def add_records(self, state: dict, records: list[dict]) -> dict:
        """The epoch tested right after its snapshot: keep its record with that snapshot."""
        state = dict(state, epoch=len(records), records=list(records), pending=None)
        write_json(self.path, state)
        return state

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class EpochRecorder:
    """Watches the solver's events and turns each epoch (train iterations, then the test
    at the epoch's end) into a record; saves the run state at every epoch's snapshot."""

    def __init__(self, plan: RunPlan, store: RunState, state: dict | None,
                 on_epoch: Callable[[dict], None] | None):
        self.plan, self.store, self.state, self.on_epoch = plan, store, state, on_epoch
        self.records: list[dict] = list(state["records"]) if state else []
        self._reset((state or {}).get("pending"))

    def _reset(self, pending: dict | None = None) -> None:
        """Start an epoch's accumulators (a resumed run: those saved with the snapshot)."""
        pending = pending or {}
        self.losses = list(pending.get("losses", []))
        self.totals = list(pending.get("totals", []))
        self.train_seconds = float(pending.get("train_seconds", 0.0))
        self.lr = float(pending.get("lr", math.nan))

    def __call__(self, event) -> None:
        if isinstance(event, IterationDone):
            self.losses.append(event.outputs[self.plan.loss_top][0])
            self.totals.append(event.loss)
            self.train_seconds += event.seconds
            self.lr = event.lr
        elif isinstance(event, SnapshotWritten):
            pending = {"losses": self.losses, "totals": self.totals,
                       "train_seconds": self.train_seconds, "lr": self.lr}
            self.state = self.store.save(event, self.plan.key, self.records, self.state, pending)
        elif isinstance(event, TestDone) and event.net_id == 0:
            self._record(event)

    def _record(self, event: TestDone) -> None:
        if self.records and self.records[-1]["iter"] >= event.iter:
            return      # a resumed run re-tests the epoch its snapshot ended: recorded already
        outputs = {name: v[0] for name, v in event.scores.items() if len(v) == 1}
        record = {"epoch": len(self.records) + 1, "iter": event.iter,
                  "train_loss": float(np.mean(self.losses)) if self.losses else math.nan,
                  "train_total_loss": float(np.mean(self.totals)) if self.totals else math.nan,
                  "test_loss": outputs[self.plan.loss_top],
                  "test_accuracy": outputs[self.plan.accuracy_top],
                  "test_outputs": outputs, "lr": self.lr,
                  "train_seconds": self.train_seconds,
                  "seconds": self.train_seconds + event.seconds}
        self.records.append(record)
        self._reset()
        if self.state and self.state["iter"] == event.iter:
            self.state = self.store.add_records(self.state, self.records)
        if self.on_epoch:
            self.on_epoch(record)


def _epoch_solver_param(plan: RunPlan, run_dir: Path) -> caffe_pb2.SolverParameter:
    """The plan's solver with the protocol's schedule: a test and a snapshot every epoch."""
    sp = caffe_pb2.SolverParameter()
    sp.CopyFrom(plan.solver_param)
    sp.snapshot_prefix = os.fspath(run_dir / "snap")
    sp.max_iter = plan.epochs * plan.iters_per_epoch
    sp.test_interval, sp.test_initialization = plan.iters_per_epoch, False
    sp.snapshot, sp.snapshot_after_train = plan.iters_per_epoch, False
    return sp


def train_run(plan: RunPlan, run_dir: Path,
              on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``plan`` for its epochs, resuming from ``run_dir`` when it holds a snapshot.

    The solver engine runs the loop; an ``EpochRecorder`` observes it. Returns the run
    record: the key, per-epoch records and timing (``resumed_at_epoch`` says where an
    earlier, interrupted process had stopped; 0 = trained in one go).
    """
    from caffe_compat.commands import device as devices
    from caffe_compat.engine.layout import apply_layout
    from caffe_compat.engine.solver.base import Solver
    from caffe_compat.formats import glog
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sp = _epoch_solver_param(plan, run_dir)
    log = glog.add_log_file(os.fspath(run_dir / "train.log"))
    try:
        shown = caffe_pb2.SolverParameter()
        shown.CopyFrom(sp)
        shown.ClearField("net_param")
        glog.info(f"run {plan.model} seed {plan.seed}, solver (net_param left out):\n"
                  + text_format.MessageToString(shown), "reproduce")
        solver = Solver(sp)
        store = RunState(run_dir)
        state = store.load(plan.key)
        recorder = EpochRecorder(plan, store, state, on_epoch)
        resumed_at = len(recorder.records)
        if state:
            solver.restore(os.fspath(run_dir / state["solverstate"]))   # data layers seek too
            torch.set_rng_state(torch.load(run_dir / state["rng"]))
            glog.info(f"resumed at epoch {resumed_at} (iteration {solver.iter})", "reproduce")
        apply_layout(solver.train_module, plan.layout)
        solver.subscribe(recorder, IterationDone, SnapshotWritten, TestDone)
        try:
            with devices.autocast(_device_choice(solver.device, plan.precision)):
                solver.solve()
        finally:
            solver.close()
    finally:
        glog.remove_log_file(log)
    return _run_record(plan, recorder.records, resumed_at)


def _device_choice(device: torch.device, precision: str):
    from caffe_compat.commands.device import DeviceChoice
    ids = [device.index or 0] if device.type == "cuda" else []
    return DeviceChoice(device.type, ids, precision)


def _run_record(plan: RunPlan, records: list[dict], resumed_at: int) -> dict:
    n_img = plan.data.n_train
    train_s = sum(r["train_seconds"] for r in records)
    return {"key": plan.key, "model": plan.model, "seed": plan.seed, "epochs": plan.epochs,
            "iters_per_epoch": plan.iters_per_epoch, "test_iter": plan.test_iter,
            "train_images": n_img, "test_images": plan.data.n_test,
            "loss_top": plan.loss_top, "accuracy_top": plan.accuracy_top,
            "solver": solver_summary(plan), "resumed_at_epoch": resumed_at,
            "precision": plan.precision, "layout": plan.layout,
            "seconds": sum(r["seconds"] for r in records),
            "train_images_per_second": n_img * len(records) / train_s if train_s else None,
            "records": records}


def run_once(model_dir: Path, seed: int, epochs: int, work: Path, record_path: Path,
             weights: str | None = None, images: Path | None = None,
             on_epoch: Callable[[dict], None] | None = None,
             report: Callable[[str], None] = lambda m: None,
             precision: str = "fp32", layout: str = "nchw") -> tuple[dict, str]:
    """One (model, seed) run with its record saved atomically at ``record_path``, computed at
    ``precision`` with ``layout`` (resolved choices, see ``protocol.plan_run``).

    Returns (record, how): how is "done" (record already there, skipped), "resumed" (continued
    from an interrupted run's last epoch snapshot) or "trained".
    """
    record_path = Path(record_path)
    plan = plan_run(model_dir, seed, epochs, work, weights, images, report, precision, layout)
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("key") != plan.key:
            raise ProtocolError(f"{record_path}: made with another protocol ({record.get('key')}"
                                f" vs now {plan.key}); use another --out or delete it")
        return record, "done"
    run_dir = Path(work) / "runs" / plan.model / f"seed{seed}"
    state = RunState(run_dir).load(plan.key)
    record = train_run(plan, run_dir, on_epoch)
    write_json(record_path, record)
    RunState(run_dir).clear()
    return record, "resumed" if state else "trained"
