"""tools/train.py (caffe train): files written, flags, signals, resume after SIGKILL, bad input.

Nets here have no Input layers: DummyData with constant fillers, or a tiny LMDB built in the
test's folder, so a run is deterministic and resumable bit for bit.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.formats.blob_io import array_to_datum
from caffe_compat.commands import train as train_cli
from caffe_compat.commands.logparse import parse_log
from caffe_compat.data.db import DBWriter
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.solver.events import IterationDone
from caffe_compat.engine.weights import read_net_weights
from tool_utils import load_tool

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DATA = ROOT / "tests" / "goldens" / "data"

# ------------------------------------------------------------------------ shared helpers
DUMMY_NET = """
name: "dummy"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 }
    data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""

LMDB_NET = """
name: "tinydb"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 }
  data_param { source: "db" backend: LMDB batch_size: 4 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "db" backend: LMDB batch_size: 4 } }
layer { name: "slow" type: "Python" bottom: "data" top: "slowed"
  python_param { module: "cli_slow_layer" layer: "SlowIdentity" param_str: "0.03" } }
layer { name: "ip1" type: "InnerProduct" bottom: "slowed" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""

SLOW_LAYER = '''
import time

import caffe_compat as caffe


class SlowIdentity(caffe.Layer):
    """top = bottom, after sleeping float(param_str) seconds (keeps a run alive to be killed)."""

    def setup(self, bottom, top):
        self.delay = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        time.sleep(self.delay)
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
'''

SOLVER = {"net": '"net.prototxt"', "test_iter": 2, "test_interval": 10, "base_lr": 0.01,
          "momentum": 0.9, "weight_decay": 0.0005, "lr_policy": '"step"', "gamma": 0.5,
          "stepsize": 10, "display": 5, "max_iter": 20, "snapshot": 10,
          "snapshot_prefix": '"snap/run"', "random_seed": 3}


def write_solver(folder: Path, net_text: str = DUMMY_NET, name: str = "solver.prototxt",
                 **overrides) -> Path:
    """The net as net.prototxt and a solver (SOLVER with ``overrides``; None drops a field)."""
    (folder / "net.prototxt").write_text(net_text)
    fields = {**SOLVER, **overrides}
    text = "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)
    path = folder / name
    path.write_text(text)
    return path


def make_lmdb(path: Path, count: int = 8, seed: int = 0) -> None:
    """``count`` random 3×4×4 uint8 records with labels 0..2 (keys in order)."""
    rng = np.random.default_rng(seed)
    with DBWriter(path, "lmdb") as db:
        for i in range(count):
            img = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
            db.put(f"{i:08d}", array_to_datum(img, int(rng.integers(0, 3))).SerializeToString())


def weights_of(path: Path) -> dict[str, list[np.ndarray]]:
    net = read_net_weights(str(path))
    return {l.name: [np.array(b.data, dtype=np.float32) for b in l.blobs]
            for l in net.layer if len(l.blobs)}


def run_train(argv: list[str]) -> int:
    return load_tool("train").main(argv)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------ a normal run
def test_train_writes_snapshots_log_plot_and_summary(workdir, capsys):
    solver = write_solver(workdir)
    assert run_train(["--solver", str(solver)]) == 0
    out, err = capsys.readouterr()
    for it in (10, 20):
        assert (workdir / f"snap/run_iter_{it}.caffemodel").is_file()
        assert (workdir / f"snap/run_iter_{it}.solverstate").is_file()
    log = workdir / "snap/run.log"
    assert log.is_file() and (workdir / "snap/run.png").stat().st_size > 1000
    assert "Snapshot:     snap/run_iter_20.caffemodel" in out
    assert "Solver state: snap/run_iter_20.solverstate" in out
    assert re.search(r"Test net #0 \(iteration 20\): accuracy = [\d.e+-]+, loss = ", out)
    assert "Log:          snap/run.log" in out and "Plot:         snap/run.png" in out
    text = log.read_text()
    assert text.startswith("Log file created at: ")
    # stderr carries the same glog lines as the file
    assert "Solving dummy" in err and "Solving dummy" in text
    assert "] Optimization Done." in text and "caffe.cpp:232] Starting Optimization" in text
    data = parse_log(log)
    assert [r.iter for r in data.train if r.outputs] == [0, 5, 10, 15]
    assert [r.iter for r in data.test] == [0, 10, 20]
    state = caffe_pb2.SolverState()
    state.ParseFromString((workdir / "snap/run_iter_20.solverstate").read_bytes())
    assert state.iter == 20 and state.learned_net == "snap/run_iter_20.caffemodel"


def test_iterations_overrides_max_iter_and_prefix_folder_is_created(workdir, capsys):
    solver = write_solver(workdir, snapshot_prefix='"out/deep/net"', snapshot=0)
    assert run_train(["-solver", str(solver), "--iterations=7", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert (workdir / "out/deep/net_iter_7.caffemodel").is_file()   # snapshot_after_train
    assert not (workdir / "out/deep/net.png").exists()
    assert "Plot:" not in out
    states = parse_log(workdir / "out/deep/net.log").solver_states
    assert states == ["out/deep/net_iter_7.solverstate"]


def test_weights_finetune_copies_layers_by_name(workdir, capsys):
    solver = write_solver(workdir, max_iter=0, snapshot=0, test_iter=None, test_interval=None)
    assert run_train(["--solver", str(solver), "--no-plot"]) == 0
    first = weights_of(workdir / "snap/run_iter_0.caffemodel")
    shutil.move(workdir / "snap/run_iter_0.caffemodel", workdir / "init.caffemodel")
    solver2 = write_solver(workdir, name="s2.prototxt", max_iter=0, snapshot=0, random_seed=99,
                           test_iter=None, test_interval=None, snapshot_prefix='"ft/run"')
    assert run_train(["--solver", str(solver2), "--weights", "init.caffemodel", "--no-plot"]) == 0
    tuned = weights_of(workdir / "ft/run_iter_0.caffemodel")
    for name, blobs in first.items():
        for a, b in zip(blobs, tuned[name]):
            np.testing.assert_array_equal(a, b)
    assert "Test:         the solver has no test nets" in capsys.readouterr().out


def test_solver_mode_gpu_without_cuda_fails_or_falls_back(workdir, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    solver = write_solver(workdir, solver_mode="GPU", max_iter=2, test_iter=None,
                          test_interval=None)
    assert run_train(["--solver", str(solver)]) == 1
    err = capsys.readouterr().err
    assert "solver_mode: GPU (device_id 0) asks for CUDA" in err and "--allow-cpu" in err
    assert run_train(["--solver", str(solver), "--allow-cpu", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^W\d{4} .*asks for CUDA.*using the CPU", err, re.M)


def test_bf16_autocast_trains_on_cpu(workdir, capsys):
    solver = write_solver(workdir, max_iter=4, snapshot=0, test_interval=2)
    assert run_train(["--solver", str(solver), "--precision", "bf16", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "autocast(bf16)" in err
    data = parse_log(workdir / "snap/run.log")
    assert all(np.isfinite(r.loss) for r in data.train)


# ------------------------------------------------------------------------ signals
class _SignalAt:
    """Solver hook: send ``signum`` to this process once, after iteration ``at``."""

    def __init__(self, signum: int, at: int):
        self.signum, self.at, self.sent = signum, at, False

    def __call__(self, solver):
        if solver.iter == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _with_hook(monkeypatch, hook):
    base = train_cli.Solver

    class Hooked(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.subscribe(hook, IterationDone)
    monkeypatch.setattr(train_cli, "Solver", Hooked)


def test_sigint_snapshots_and_stops(workdir, capsys, monkeypatch):
    _with_hook(monkeypatch, _SignalAt(signal.SIGINT, 4))
    solver = write_solver(workdir, snapshot=0)
    previous = signal.getsignal(signal.SIGINT)
    assert run_train(["--solver", str(solver), "--no-plot"]) == 0
    assert signal.getsignal(signal.SIGINT) is previous          # handler restored
    out = capsys.readouterr().out
    assert "Stopped early at iteration 4" in out
    assert (workdir / "snap/run_iter_4.solverstate").is_file()
    assert not (workdir / "snap/run_iter_20.caffemodel").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_snapshots_and_continues(workdir, capsys, monkeypatch):
    _with_hook(monkeypatch, _SignalAt(signal.SIGHUP, 4))
    solver = write_solver(workdir, snapshot=0, max_iter=8, test_interval=4)
    assert run_train(["--solver", str(solver), "--no-plot"]) == 0
    assert (workdir / "snap/run_iter_4.solverstate").is_file()   # the requested snapshot
    assert (workdir / "snap/run_iter_8.solverstate").is_file()   # training went on


def test_signal_effect_none_ignores_sigint(workdir, capsys, monkeypatch):
    _with_hook(monkeypatch, _SignalAt(signal.SIGINT, 2))
    solver = write_solver(workdir, snapshot=0, max_iter=6, test_interval=3)
    assert run_train(["--solver", str(solver), "--sigint_effect", "none", "--no-plot"]) == 0
    assert sorted(p.name for p in (workdir / "snap").glob("*.solverstate")) == \
        ["run_iter_6.solverstate"]


# ------------------------------------------------------------------------ resume after SIGKILL
def _lmdb_solver(folder: Path, prefix: str) -> Path:
    make_lmdb(folder / "db") if not (folder / "db").exists() else None
    (folder / "cli_slow_layer.py").write_text(SLOW_LAYER)
    # 8 records, batch 4: every 2 iterations (a snapshot interval) is one epoch, and each
    # test round (2 batches) reads the whole database, so a resumed run sees the same data.
    return write_solver(folder, LMDB_NET, name=f"{prefix}.prototxt", max_iter=12, snapshot=4,
                        display=2, test_interval=4, stepsize=6, momentum=0.9,
                        snapshot_prefix=f'"{prefix}/run"', base_lr=0.5)


def _kill_after_snapshot(cmd: list[str], state: Path, env: dict, timeout: float = 120) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not state.exists():
            if proc.poll() is not None:
                raise AssertionError("training ended before it could be killed:\n" +
                                     proc.stderr.read().decode()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"no {state.name} after {timeout}s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _latest_state(folder: Path) -> Path:
    states = list(folder.glob("run_iter_*.solverstate"))
    return max(states, key=lambda p: int(re.search(r"_iter_(\d+)\.", p.name).group(1)))


def test_sigkill_then_resume_matches_uninterrupted_run(workdir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(workdir))
    # Uninterrupted reference run, in this process.
    full = _lmdb_solver(workdir, "full")
    assert run_train(["--solver", str(full), "--no-plot"]) == 0
    # The same training in a child process, SIGKILLed right after its first snapshot.
    killed = _lmdb_solver(workdir, "killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)])}
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--solver", str(killed),
           "--no-plot", "--progress", "never"]
    rc = _kill_after_snapshot(cmd, workdir / "killed/run_iter_4.solverstate", env)
    assert rc == -signal.SIGKILL
    assert not (workdir / "killed/run_iter_12.caffemodel").exists()
    resume_from = _latest_state(workdir / "killed")
    resumed_at = int(re.search(r"_iter_(\d+)\.", resume_from.name).group(1))
    assert resumed_at < 12
    capsys.readouterr()
    assert run_train(["--solver", str(killed), "--snapshot", str(resume_from), "--no-plot"]) == 0
    # Identical final weights, and identical logged outputs from the resume point on.
    a = weights_of(workdir / "full/run_iter_12.caffemodel")
    b = weights_of(workdir / "killed/run_iter_12.caffemodel")
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)
    full_log = parse_log(workdir / "full/run.log")
    killed_log = parse_log(workdir / "killed/run.log")
    assert killed_log.restored_from == [str(resume_from)]

    def after(rows):
        return [(r.iter, r.outputs) for r in rows if r.iter >= resumed_at and r.outputs]
    assert after(full_log.latest(full_log.train)) == after(killed_log.latest(killed_log.train))
    assert after(full_log.latest(full_log.test)) == after(killed_log.latest(killed_log.test))
    # The appended log still reads as one run: the resumed part follows the killed part.
    assert killed_log.train[0].iter == 0 and killed_log.train[-1].iter == 12


@pytest.mark.slow
def test_sigkill_resume_golden_net_with_mirror(workdir, capsys):
    """The golden tiny net (mirror: true, 30 records, batch 10), killed after iteration 15.

    Data layers continue from the batch the uninterrupted run would read next, so the
    resumed run is bit-identical even with random mirroring."""
    for name in ("color32_lmdb", "color32_leveldb"):
        shutil.copytree(GOLDEN_DATA / name, workdir / name)
    net = (GOLDEN_DATA / "train_val.prototxt").read_text()
    base = (GOLDEN_DATA / "solver.prototxt").read_text()
    for prefix in ("full", "killed"):
        (workdir / f"{prefix}.prototxt").write_text(
            base.replace('"snap/tiny"', f'"{prefix}/tiny"'))
    (workdir / "train_val.prototxt").write_text(net)
    assert run_train(["--solver", "full.prototxt", "--no-plot"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as conftest: same sums
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--solver", "killed.prototxt",
           "--no-plot", "--progress", "never"]
    _kill_after_snapshot(cmd, workdir / "killed/tiny_iter_15.solverstate", env)
    assert run_train(["--solver", "killed.prototxt", "--snapshot",
                      "killed/tiny_iter_15.solverstate", "--no-plot"]) == 0
    a = weights_of(workdir / "full/tiny_iter_30.caffemodel")
    b = weights_of(workdir / "killed/tiny_iter_30.caffemodel")
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)


# ------------------------------------------------------------------------ bad input
def _fails(argv, capsys, *needles) -> str:
    assert run_train(argv) == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("train.py: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_solver_file(workdir, capsys):
    _fails(["--solver", "nope.prototxt"], capsys, "nope.prototxt: no such file")


def test_no_solver_flag(workdir, capsys):
    _fails([], capsys, "Need a solver definition", "--solver")


def test_malformed_solver_names_file_and_line(workdir, capsys):
    path = write_solver(workdir)
    path.write_text(path.read_text() + "base_lr 0.1 }\n")
    line = len(path.read_text().splitlines())
    _fails(["--solver", str(path)], capsys, f"solver.prototxt:{line}:")


def test_net_path_not_found(workdir, capsys):
    path = write_solver(workdir, net='"nets/missing.prototxt"')
    _fails(["--solver", str(path)], capsys, "net file 'nets/missing.prototxt' not found")


def test_unknown_solver_type_lists_known(workdir, capsys):
    path = write_solver(workdir, type='"Lion"')
    _fails(["--solver", str(path)], capsys, "Unknown solver type: Lion",
           "SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam")


def test_unknown_lr_policy_lists_known(workdir, capsys):
    path = write_solver(workdir, lr_policy='"warmup"')
    _fails(["--solver", str(path)], capsys, "'warmup'",
           "fixed, step, exp, inv, multistep, poly, sigmoid")


def test_weights_and_snapshot_are_exclusive(workdir, capsys):
    path = write_solver(workdir)
    _fails(["--solver", str(path), "--weights", "a.caffemodel", "--snapshot", "b.solverstate"],
           capsys, "not both")


def test_missing_weights_file(workdir, capsys):
    path = write_solver(workdir)
    _fails(["--solver", str(path), "--weights", "a.caffemodel"], capsys,
           "--weights a.caffemodel: no such file")


NAN_NET = """
name: "diverge"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 }
    data_filler { type: "constant" value: 100 } data_filler { type: "constant" value: 0 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""


def test_nan_loss_is_one_line_and_keeps_a_snapshot(workdir, capsys):
    path = write_solver(workdir, NAN_NET, base_lr=1e6, momentum=0.0, weight_decay=0.0,
                        test_iter=None, test_interval=None, snapshot=0, max_iter=50)
    line = _fails(["--solver", str(path)], capsys, "Iteration ", "the training loss is",
                  "snapshot")
    assert list((workdir / "snap").glob("run_iter_*.solverstate"))
    assert line in ("train.py: error: " + l.split("] ", 1)[1]
                    for l in (workdir / "snap/run.log").read_text().splitlines()
                    if l.startswith("E") and "] " in l)


def test_debug_flag_shows_traceback(workdir, capsys):
    path = write_solver(workdir, type='"Lion"')
    assert run_train(["--solver", str(path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "train.py: error: " in err
