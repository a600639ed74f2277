"""A training run SIGKILLed at random moments, resumed each time with ``--snapshot auto``,
ends with the same weights as an uninterrupted run (issue 12's kill test).

The kill moments are drawn from a seeded generator, so the test is repeatable; a kill that
lands during start-up or in the middle of a snapshot write is part of the point (the writer
is atomic, and --snapshot auto removes the temporaries of a dead writer and picks the newest
complete pair).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.data.db import DBWriter
from caffe_compat.engine.weights import read_net_weights
from caffe_compat.formats.atomic import TEMP_MARK
from caffe_compat.formats.blob_io import array_to_datum

ROOT = Path(__file__).resolve().parents[1]
NET = """name: "killme"
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 } data_param { source: "db" backend: LMDB batch_size: 4 } }
layer { name: "slow" type: "Python" bottom: "data" top: "slowed"
  python_param { module: "kill_slow_layer" layer: "SlowIdentity" param_str: "0.05" } }
layer { name: "ip1" type: "InnerProduct" bottom: "slowed" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""
# the layer that keeps a run alive long enough to be killed: test_cli_train's
from test_cli_train import SLOW_LAYER  # noqa: E402

MAX_ITER = 24


def _setup(folder: Path, name: str) -> Path:
    """A solver snapshotting every 3 iterations into ``folder/name/``."""
    if not (folder / "db").exists():
        rng = np.random.default_rng(0)
        with DBWriter(folder / "db", "lmdb") as db:
            for i in range(8):
                img = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
                db.put(f"{i:08d}", array_to_datum(img, i % 3).SerializeToString())
        (folder / "net.prototxt").write_text(NET)
        (folder / "kill_slow_layer.py").write_text(SLOW_LAYER)
    solver = folder / f"{name}.prototxt"
    solver.write_text(f'net: "net.prototxt"\nbase_lr: 0.5\nmomentum: 0.9\nlr_policy: "step"\n'
                      f'gamma: 0.5\nstepsize: 10\nmax_iter: {MAX_ITER}\nsnapshot: 3\n'
                      f'display: 0\nrandom_seed: 5\nsnapshot_prefix: "{name}/run"\n')
    return solver


def _command(solver: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), "--solver", str(solver),
            "--no-plot", "--progress", "never", *extra]


def _weights(path: Path) -> dict[str, list[np.ndarray]]:
    net = read_net_weights(str(path))
    return {l.name: [np.array(b.data, np.float32) for b in l.blobs] for l in net.layer
            if len(l.blobs)}


@pytest.mark.slow
def test_random_kills_then_snapshot_auto_match_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "CAFFE_COMPAT_DATA_WORKERS": "1"}
    run = lambda cmd, **kw: subprocess.run(cmd, cwd=tmp_path, env=env,  # noqa: E731
                                           capture_output=True, text=True, **kw)
    reference = run(_command(_setup(tmp_path, "full")), timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    solver = _setup(tmp_path, "killed")
    rng = random.Random(12)
    landed = 0
    final = tmp_path / f"killed/run_iter_{MAX_ITER}.caffemodel"
    log_path = tmp_path / "killed/run.log"
    for _ in range(6):                       # bounded: at most six kills
        started = log_path.stat().st_size if log_path.exists() else 0
        proc = subprocess.Popen(_command(solver, "--snapshot", "auto"), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and (
                not log_path.exists() or log_path.stat().st_size <= started):
            time.sleep(0.01)                 # wait until this run has opened its log
        time.sleep(rng.uniform(0.0, 1.5))    # then kill it at a random moment
        if proc.poll() is None:
            proc.kill()
            landed += 1
        proc.wait(60)
        if final.exists():
            break
    finished = run(_command(solver, "--snapshot", "auto"), timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert landed >= 2, "the kills all missed the run: lengthen the slow layer's delay"
    print(f"kills that landed: {landed}")

    a, b = _weights(tmp_path / f"full/run_iter_{MAX_ITER}.caffemodel"), _weights(final)
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)
    leftovers = [p.name for p in (tmp_path / "killed").iterdir() if TEMP_MARK in p.name]
    assert leftovers == [], f"temporaries left after resuming: {leftovers}"
    log = (tmp_path / "killed/run.log").read_text()
    assert log.count("Log file created at") >= landed + 1  # every run appended to the log
    assert "Resuming from" in log                          # some kill landed after a snapshot
