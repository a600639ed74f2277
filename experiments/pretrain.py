"""Pretraining for the fine-tuned Table 1: a model on Fashion-MNIST minus data/fashion50.

ImageNet weights cannot be downloaded here, so the closest honest analogue of the paper's
"fine-tune a pretrained VGG16" is to pretrain on the rest of Fashion-MNIST: the 60,000
training images minus the 500 of data/fashion50 (every train and test image of every 40/10
split comes from those 500), i.e. 59,500 images. The 10,000 t10k images are the pretraining
test set; no split uses them either.

``pretrain(model)`` trains ``models/<model>/train_val.prototxt`` with
``models/<model>/solver_pretrain.prototxt`` (Data layers pointed at the pretraining LMDBs in
memory, train batch 64 / test batch 100), on the one solver engine. Resumable: it snapshots
every ``snapshot`` iterations and a rerun continues from the newest complete snapshot. The
result is ``runs/pretrain/<model>/<model>_pretrained.caffemodel`` (written atomically) and
``pretrain.json`` beside it (solver, budget, test accuracy, wall time).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

from experiments.reproduce.protocol import (SplitData, embed_net, output_of,
                                            solver_summary_line, write_json)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IDX = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DB = REPO / "data" / "fmnist_pretrain_lmdb_72_color"
DEFAULT_WORK = REPO / "runs" / "pretrain"
TRAIN_BATCH, TEST_BATCH = 64, 100
_INDEX = re.compile(r"^(\d+)\.png$")


def fashion50_indices(images: Path = REPO / "data" / "fashion50") -> frozenset[int]:
    """The Fashion-MNIST training-set indices of every image in ``images`` (<class>/<index>.png)."""
    found = set()
    for png in Path(images).glob("*/*.png"):
        m = _INDEX.match(png.name)
        if not m:
            raise ValueError(f"{png}: not named <index>.png; cannot tell which IDX image it is")
        found.add(int(m.group(1)))
    if not found:
        raise ValueError(f"{images}: no <class>/<index>.png images")
    return frozenset(found)


def record_index(key: bytes | str) -> int:
    """The IDX index a pretraining LMDB key carries (``00001234_train/coat/01234.png``)."""
    key = key.decode() if isinstance(key, bytes) else key
    return int(key.split("_", 1)[0])


def build_pretrain_data(idx_dir: Path = DEFAULT_IDX, db: Path = DEFAULT_DB,
                        images: Path = REPO / "data" / "fashion50") -> tuple[SplitData, float]:
    """The pretraining LMDBs (3-channel 72×72 as the splits' records, so conv1 transfers)."""
    from caffe_compat.data.db import open_db
    from experiments.fashion_mnist import build_lmdbs
    seconds = build_lmdbs(Path(idx_dir), Path(db), 72, color=True,
                          exclude_train=fashion50_indices(images))
    counts = []
    for split in ("train", "test"):
        with open_db(Path(db) / split) as reader:
            counts.append(len(reader))
    return SplitData(Path(db) / "train", Path(db) / "test", Path(db) / "mean.binaryproto",
                     *counts), seconds


def pretrained_path(model: str, work: Path = DEFAULT_WORK) -> Path:
    return Path(work) / model / f"{model}_pretrained.caffemodel"


def pretrain_solver(model_dir: Path, data: SplitData, work: Path):
    """The model's solver_pretrain.prototxt with the net it names pointed at ``data``."""
    from caffe_compat.engine.solver.params import read_solver_param
    model_dir = Path(model_dir)
    solver_path = model_dir / "solver_pretrain.prototxt"
    if not solver_path.is_file():
        raise SystemExit(f"error: {solver_path}: missing (the pretraining solver of "
                         f"{model_dir.name})")
    sp = read_solver_param(os.fspath(solver_path))
    net_path = embed_net(sp, solver_path, data, TRAIN_BATCH, TEST_BATCH)
    del sp.test_iter[:]
    sp.test_iter.append(math.ceil(data.n_test / TEST_BATCH))
    run_dir = Path(work) / model_dir.name
    run_dir.mkdir(parents=True, exist_ok=True)
    sp.snapshot_prefix = os.fspath(run_dir / "snap")
    sp.snapshot_after_train = False
    return sp, net_path


def pretrain(model: str, idx_dir: Path = DEFAULT_IDX, db: Path = DEFAULT_DB,
             work: Path = DEFAULT_WORK, report: Callable[[str], None] = print,
             precision: str = "fp32", layout: str = "nchw",
             models: Path = REPO / "models") -> Path:
    """Pretrain ``models/<model>`` (resuming a killed run); returns the caffemodel path.
    ``precision`` fp32 (Caffe's arithmetic), bf16 or auto (bf16 autocast of the passes where
    this CPU runs it natively and faster; weights, gradients and the solver stay float32) and
    ``layout`` nchw, nhwc or auto, as tools/full_fashion_mnist.py takes them."""
    from caffe_compat.commands import device as devices
    from caffe_compat.commands.progress import TrainProgress
    from caffe_compat.engine.solver.base import Solver
    from caffe_compat.engine.solver.events import TestDone
    from caffe_compat.engine.solver.snapshot import latest_snapshot
    from caffe_compat.formats import glog
    from caffe_compat.engine import weights
    from experiments.full_fashion_mnist import use_layout
    final = pretrained_path(model, work)
    if final.is_file():
        return final
    data, build_seconds = build_pretrain_data(idx_dir, db)
    sp, net_path = pretrain_solver(Path(models) / model, data, work)
    run_dir = final.parent
    log = glog.add_log_file(os.fspath(run_dir / "train.log"))
    tests: list[dict] = []
    try:
        choice = devices.select(None, None, allow_cpu=True, precision=precision)
        solver = Solver(sp)
        resume = latest_snapshot(sp.snapshot_prefix)
        if resume:
            solver.restore(resume)
            report(f"{model}: resuming pretraining from {resume}")
        layout, _ = use_layout(solver, layout, choice.precision)
        acc_top = output_of(sp.net_param, "Accuracy", os.fspath(net_path))
        solver.subscribe(lambda e: tests.append({"iter": e.iter,
                                                 "accuracy": e.scalar(acc_top)})
                         if e.net_id == 0 else None, TestDone)
        progress = TrainProgress(sp.max_iter).attach(solver)
        start, first = time.perf_counter(), solver.iter
        try:
            with devices.autocast(choice):
                solver.solve()
                if not tests or tests[-1]["iter"] != solver.iter:
                    # Caffe tests at the end only on a test_interval boundary: the weights
                    # this writes must have their own t10k figure
                    solver.test_all()
        finally:
            progress.close()
        seconds = time.perf_counter() - start
        weights.save(solver.train_module, os.fspath(final))     # atomic
        solver.close()
    finally:
        glog.remove_log_file(log)
    images = (sp.max_iter - first) * TRAIN_BATCH * sp.iter_size
    write_json(run_dir / "pretrain.json", {
        "model": model, "solver": solver_summary_line(sp),
        "train_images": data.n_train, "test_images": data.n_test,
        "epochs": sp.max_iter * TRAIN_BATCH * sp.iter_size / data.n_train,
        "tests": tests, "seconds_this_invocation": seconds, "images_this_invocation": images,
        "precision": choice.precision, "layout": layout,
        "lmdb_build_seconds": build_seconds,
        "finished": datetime.datetime.now().isoformat(timespec="seconds")})
    for old in run_dir.glob("snap_iter_*"):
        old.unlink()
    report(f"{model}: pretrained {sp.max_iter} iterations; last test accuracy "
           f"{tests[-1]['accuracy'] * 100:.2f}% on {data.n_test} t10k images" if tests else
           f"{model}: pretrained {sp.max_iter} iterations")
    return final


def pretrain_summary(model: str, work: Path = DEFAULT_WORK) -> dict | None:
    """What ``pretrain.json`` says about a finished pretraining (None if there is none)."""
    path = Path(work) / model / "pretrain.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

