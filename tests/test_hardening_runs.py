"""Issue 27, runs: one run per snapshot_prefix (a lock), dead writers' temporaries removed on
rewrite, unrelated runs kept apart in one log (parse_log, plot_log, metrics), and progress
lines with images/s and an ETA in the log."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from caffe_compat.commands.logparse import parse_log, save_csv_files
from caffe_compat.commands.plot import curves_from_log
from caffe_compat.commands.progress import Pace, TrainProgress
from caffe_compat.data.db import DBWriter
from caffe_compat.engine.solver.events import IterationDone, RunStarted
from caffe_compat.formats.atomic import write_bytes
from caffe_compat.formats.prefix_lock import PrefixBusy, PrefixLock, lock_path_for
from test_cli_train import run_train, write_solver


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lock_file(path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"pid={pid}\nhost={socket.gethostname()}\nstarted=1800000000\n"
                    "command=caffe train\n")


# ------------------------------------------------------------------------ the prefix lock
def test_a_second_run_over_a_prefix_is_refused_naming_the_first(workdir, capsys):
    solver = write_solver(workdir, max_iter=4, snapshot=0, test_iter=None,
                          test_interval=None)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_file(workdir / "snap/run.lock", holder.pid)
        assert run_train(["--solver", str(solver), "--no-plot"]) != 0
        err = capsys.readouterr().err
        assert f"snapshot_prefix 'snap/run' is in use by another run (pid {holder.pid} on " \
               f"host {socket.gethostname()}" in err
        assert "Traceback" not in err and not (workdir / "snap/run.log").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a warning, removed at the end
    assert run_train(["--solver", str(solver), "--no-plot"]) == 0
    log = (workdir / "snap/run.log").read_text()
    assert f"taking over snap/run.lock: its run (pid {holder.pid} " in log
    assert not (workdir / "snap/run.lock").exists()


def test_prefix_lock_in_process(tmp_path, caplog):
    prefix = str(tmp_path / "a" / "net")
    assert lock_path_for(str(tmp_path) + "/") == tmp_path / "train.lock"
    with PrefixLock(prefix) as lock:
        owner = lock.path.read_text()
        assert f"pid={os.getpid()}\n" in owner and f"host={socket.gethostname()}\n" in owner
        with pytest.raises(PrefixBusy, match=f"pid {os.getpid()} on host"):
            PrefixLock(prefix).acquire()
    assert not lock.path.exists()
    _lock_file(lock.path, 4_000_000_000)                        # never a live pid
    with caplog.at_level(logging.WARNING, logger="caffe_compat"), PrefixLock(prefix):
        assert "is no longer running" in caplog.text
    lock.path.write_text(f"pid={os.getpid()}\nhost=elsewhere.example\n")
    with pytest.raises(PrefixBusy, match="host elsewhere.example"):   # not ours to judge
        PrefixLock(prefix).acquire()


# ------------------------------------------------------------------------ temporaries
def test_rewriting_an_output_removes_dead_writers_temporaries(tmp_path, caplog):
    dead, live = _dead_pid(), os.getpid()
    stale_db = tmp_path / f".out_lmdb.tmp-{dead}-0a0b0c0d"
    stale_db.mkdir()
    (stale_db / "data.mdb").write_bytes(b"\0" * 4096)
    stale_model = tmp_path / f".net_iter_5.caffemodel.tmp-{dead}-01020304"
    stale_model.write_bytes(b"partial")
    in_use = tmp_path / f".net_iter_5.caffemodel.tmp-{live}-05060708"   # a live writer
    in_use.write_bytes(b"being written")
    other = tmp_path / f".net_iter_50.caffemodel.tmp-{dead}-0a0b0c0d"   # another output
    other.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="caffe_compat"):
        with DBWriter(tmp_path / "out_lmdb", "lmdb") as db:
            db.put("0", b"x")
        write_bytes(tmp_path / "net_iter_5.caffemodel", b"model")
    assert not stale_db.exists() and not stale_model.exists()
    assert in_use.exists() and other.exists()
    assert caplog.text.count("left by a writer that was killed") == 2
    assert f".out_lmdb.tmp-{dead}-0a0b0c0d" in caplog.text


def test_a_plain_train_run_clears_killed_snapshot_temporaries(workdir):
    solver = write_solver(workdir, max_iter=2, snapshot=0, test_iter=None, test_interval=None)
    (workdir / "snap").mkdir()
    stale = workdir / f"snap/.run_iter_10.caffemodel.tmp-{_dead_pid()}-00000000"
    stale.write_bytes(b"\0" * 1000)
    assert run_train(["--solver", str(solver), "--no-plot"]) == 0
    assert not stale.exists()
    assert "left by a writer that was killed" in (workdir / "snap/run.log").read_text()


# ------------------------------------------------------------------------ runs in one log
def test_unrelated_runs_over_one_prefix_are_kept_apart(workdir, capsys):
    solver = write_solver(workdir, max_iter=10, snapshot=10, test_interval=5)
    for _ in range(2):                                           # two unrelated runs
        assert run_train(["--solver", str(solver)]) == 0
    solver2 = write_solver(workdir, name="s2.prototxt", max_iter=20, snapshot=10,
                           test_interval=5)
    assert run_train(["--solver", str(solver2), "--snapshot",        # resumes run 2
                      "snap/run_iter_10.solverstate"]) == 0
    capsys.readouterr()
    log = workdir / "snap/run.log"
    assert "holds an earlier run: a new run starts here" in log.read_text()
    data = parse_log(log)
    assert data.runs() == [0, 1]
    assert [r.iter for r in data.train if r.run == 0] == [0, 5, 10]
    assert [r.iter for r in data.train if r.run == 1] == [0, 5, 10, 10, 15, 20]   # resumed
    assert [r.iter for r in data.test if r.run == 1] == [0, 5, 10, 10, 15, 20]
    (workdir / "csv").mkdir()
    written = save_csv_files(str(log), str(workdir / "csv"), data)
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["run.log.run1.test", "run.log.run1.train", "run.log.test", "run.log.train"]
    first = (workdir / "csv/run.log.run1.train").read_text().splitlines()
    assert [line.split(",")[0] for line in first[1:]] == ["0.0", "5.0"]
    curves = curves_from_log(data)
    assert [k for k, _ in curves.earlier] == [1]
    assert [it for it, _ in curves.train["loss"]] == [0, 5, 10, 15]
    assert [it for it, _ in curves.earlier[0][1].train["loss"]] == [0, 5]
    rows = [json.loads(line) for line in (workdir / "snap/run.metrics.jsonl").open()]
    runs = [(r["run"], r["resumed"], r["iter"]) for r in rows if r["kind"] == "run"]
    assert runs == [(1, False, 0), (2, False, 0), (2, True, 10)]


def test_plot_log_draws_each_run_apart(workdir, capsys):
    from caffe_compat.commands.plot import plot_log
    solver = write_solver(workdir, max_iter=10, snapshot=0, test_interval=5)
    for _ in range(2):
        assert run_train(["--solver", str(solver), "--no-plot"]) == 0
    png = plot_log(str(workdir / "snap/run.log"), str(workdir / "runs.png"))
    assert os.path.getsize(png) > 5000
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from caffe_compat.commands import plot as plot_module
    labels = []
    original = plot_module.save_figure
    plot_module.save_figure = lambda fig, *a, **k: labels.extend(
        line.get_label() for ax in fig.axes for line in ax.get_lines())
    try:
        plot_log(str(workdir / "snap/run.log"), str(workdir / "again.png"))
    finally:
        plot_module.save_figure = original
        plt.close("all")
    assert "loss (train, run 1)" in labels and "loss (train, run 2)" in labels
    assert "accuracy (test, run 1)" in labels and "accuracy (test, run 2)" in labels


# ------------------------------------------------------------------------ progress
def test_progress_lines_in_the_log_without_a_terminal(workdir, capsys):
    solver = write_solver(workdir, max_iter=20, display=5, snapshot=0, test_iter=None,
                          test_interval=None)
    assert run_train(["--solver", str(solver), "--no-plot"]) == 0   # stderr is no terminal
    lines = [line for line in (workdir / "snap/run.log").read_text().splitlines()
             if "Progress: " in line]
    assert len(lines) == 4
    assert "Progress: iteration 5/20 (25.0%), " in lines[0]
    assert "Progress: iteration 20/20 (100.0%), " in lines[-1]
    assert all(" images/s, elapsed 0:00:" in line and ", ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")


def test_images_per_iteration_is_batch_times_iter_size(workdir):
    import caffe_compat as caffe
    solver = caffe.get_solver(str(write_solver(workdir, iter_size=3, snapshot=0)))
    assert solver.images_per_iter == 4 * 3           # DummyData batch 4, iter_size 3


def test_pace_counts_images_as_iterations_times_batch_times_iter_size():
    ticks = iter([0.0, 100.0, 102.0, 106.0])
    pace = Pace(100, clock=lambda: next(ticks))
    pace.start(0, images_per_iter=8 * 2)          # batch 8, iter_size 2
    assert pace.line(10) == ("Progress: iteration 10/100 (10.0%), 80.0 images/s, elapsed "
                             "0:00:02, ETA 0:00:18")
    # the next line's rate covers only its own span: 10 iterations × 16 images in 4 s
    assert pace.line(20).startswith("Progress: iteration 20/100 (20.0%), 40.0 images/s, "
                                    "elapsed 0:00:06, ETA 0:00:24")


def test_progress_bar_images_per_second_counts_wall_clock_time():
    """The bar once divided by each iteration's own compute time (img/s=1997 shown at 17 it/s,
    batch 8): it is iterations × images per iteration over the wall-clock span."""
    ticks = iter(float(t) for t in range(0, 100))        # half a second per reading
    progress = TrainProgress(50, enabled=True, file=io.StringIO(), smoothing=1.0,
                             clock=lambda: next(ticks) * 0.5)
    solver = SimpleNamespace(iter=0, param=SimpleNamespace(display=0),
                             subscribe=lambda *a: None,
                             events=SimpleNamespace(unsubscribe=lambda *a: None))
    progress.attach(solver)
    try:
        progress.on_event(RunStarted(0, 50, 8 * 2))       # batch 8, iter_size 2
        for i in range(1, 6):                             # each iteration: 0.5 s of wall time
            progress.on_event(IterationDone(i, 1.0, 1.0, 0.1, {}, {}, 1e-3, 16))
        assert "img/s=32.0" in progress.bar.postfix       # 16 images / 0.5 s
    finally:
        progress.close()
    assert progress.bar is None
