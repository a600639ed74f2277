"""The loop's events, the one logging system, atomic writes and an installed `caffe` command."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import caffe_compat as caffe
from caffe_compat.engine.solver.base import Solver
from caffe_compat.engine.solver import events
from caffe_compat.engine.solver.events import (NONE, STOP, EventBus, IterationDone, RunFinished,
                                               RunStarted)
from caffe_compat.formats import atomic
from tool_utils import load_tool

REPO = Path(__file__).resolve().parents[1]
NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
"""


def _solver_file(folder: Path, extra: str = "") -> Path:
    (folder / "net.prototxt").write_text(NET)
    path = folder / "solver.prototxt"
    path.write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 6 '
                    'test_iter: 1 test_interval: 3 snapshot: 3 random_seed: 1 '
                    f'snapshot_prefix: "{folder}/snap" {extra}')
    return path


def test_the_loop_tells_every_observer_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    solver = Solver(str(_solver_file(tmp_path)))
    seen = []
    solver.subscribe(lambda e: seen.append((type(e).__name__, e.iter)))
    solver.solve()
    kinds = [k for k, _ in seen]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert [i for k, i in seen if k == "IterationDone"] == [1, 2, 3, 4, 5, 6]
    assert [i for k, i in seen if k == "TestDone"] == [0, 3, 6]     # test_initialization
    assert [i for k, i in seen if k == "SnapshotWritten"] == [3, 6]
    # the test at iteration 3 runs after the snapshot of iteration 3, as in Caffe's Step
    assert seen.index(("SnapshotWritten", 3)) < seen.index(("TestDone", 3))


def test_events_carry_values_and_an_action_source_stops_the_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    solver = Solver(str(_solver_file(tmp_path)))
    tests, iters = [], []
    solver.subscribe(tests.append, events.TestDone)
    solver.subscribe(iters.append, IterationDone)
    solver.add_action_source(lambda: STOP if solver.iter >= 4 else NONE)
    solver.solve()
    assert solver.iter == 4 and solver.requested_early_exit
    assert iters[0].outputs["loss"][0] == pytest.approx(iters[0].loss)
    assert iters[0].images == 4 and iters[0].loss_weights == {"loss": 1.0}
    assert set(tests[0].scores) == {"acc", "loss"} and 0 <= tests[0].scalar("acc") <= 1


def test_bound_methods_unsubscribe():
    class Watcher:
        def __init__(self):
            self.n = 0

        def on(self, event):
            self.n += 1

        def act(self):
            return STOP
    bus, w = EventBus(), Watcher()
    bus.subscribe(w.on, RunStarted)
    bus.add_action_source(w.act)
    bus.emit(RunStarted(0, 1, 1))
    bus.emit(RunFinished(1, False))          # filtered out by kind
    assert w.n == 1 and bus.requested_action() == STOP
    bus.unsubscribe(w.on)                    # a fresh bound method: equal, not identical
    bus.remove_action_source(w.act)
    bus.emit(RunStarted(0, 1, 1))
    assert w.n == 1 and bus.requested_action() == NONE and not bus.wants(RunStarted)


def test_library_warning_reaches_the_training_log_and_stderr(tmp_path, monkeypatch, capfd):
    """Weights of another net: Caffe's "Ignoring source layer" and our warning, in both."""
    monkeypatch.chdir(tmp_path)
    other = caffe.Net(str(REPO / "tests/goldens/layers/inplace_chain/net.prototxt"), caffe.TEST)
    other.save(str(tmp_path / "other.caffemodel"))
    solver = _solver_file(tmp_path)
    train = load_tool("train")
    assert train.main(["--solver", str(solver), "--weights", str(tmp_path / "other.caffemodel"),
                       "--no-plot", "--progress", "never"]) == 0
    err = capfd.readouterr().err
    log = (tmp_path / "snap.log").read_text()
    for text in (err, log):
        assert "Ignoring source layer" in text
        assert "none of the layers of net 'tiny' is in this weights file" in text
    warning = next(line for line in log.splitlines() if "none of the layers" in line)
    assert warning.startswith("W") and "weights.py:" in warning


def test_unknown_layer_type_names_file_line_layer_and_a_suggestion(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer { name: "in" type: "Input" top: "d"\n'
                    '  input_param { shape { dim: 1 dim: 2 } } }\n'
                    'layer { name: "act" type: "Relu" bottom: "d" top: "d" }\n')
    with pytest.raises(Exception) as info:
        caffe.Net(str(path), caffe.TEST)
    message = str(info.value)
    assert str(path) in message and ":4" in message and "'act'" in message
    assert "ReLU" in message


def test_interrupted_write_leaves_neither_temporary_nor_partial_file(tmp_path):
    final = tmp_path / "model.caffemodel"
    final.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_write(final, "wb") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.caffemodel"]


def test_killed_writer_leaves_only_a_temporary_that_the_next_start_removes(tmp_path):
    code = ("import sys, time; from caffe_compat.formats import atomic\n"
            "with atomic.atomic_write(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n")
    final = tmp_path / "net_iter_5.solverstate"
    proc = subprocess.Popen([sys.executable, "-c", code, str(final)], stdout=subprocess.PIPE,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    left = list(tmp_path.iterdir())
    assert not final.exists() and len(left) == 1 and atomic.TEMP_MARK in left[0].name
    assert atomic.remove_stale_temporaries(tmp_path) == left
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_installed_caffe_command_trains_from_any_directory(tmp_path):
    """`pip install <checkout>` into a fresh venv, then `caffe train` from another folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, cwd=tmp_path)    # the CPU build
    subprocess.run(pip + [str(REPO)], check=True, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    solver = _solver_file(work)
    started = time.monotonic()
    done = subprocess.run([str(venv / "bin" / "caffe"), "train", "--solver", str(solver),
                           "--no-plot"], cwd="/tmp", capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "snap_iter_6.caffemodel").is_file() and time.monotonic() - started < 600
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import caffe_compat; print(caffe_compat.__file__)"], cwd="/tmp",
                           capture_output=True, text=True).stdout
    assert str(venv) in where          # the installed copy, not the checkout
