"""Solvers against real Caffe: 20-step trajectories, fresh and resumed (goldens/solvers)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.proto import caffe_pb2

GOLDENS = Path(__file__).parent / "goldens" / "solvers"
CASES = sorted(p.name for p in GOLDENS.iterdir() if (p / "solver.prototxt").is_file())
RTOL, ATOL = 1e-3, 1e-5
STEPS = 20


@pytest.fixture(autouse=True)
def _quiet_log(monkeypatch):
    monkeypatch.setenv("GLOG_minloglevel", "1")


def _case(tmp_path: Path, name: str) -> Path:
    """A private copy of the case folder (solver files use paths relative to it)."""
    dst = tmp_path / name
    shutil.copytree(GOLDENS / name, dst)
    return dst


def _feed(solver, feed, k: int) -> None:
    solver.net.blobs["data"].data[...] = feed["data"][k]
    solver.net.blobs["label"].data[...] = feed["label"][k]


def _check_step(solver, traj, k: int) -> None:
    np.testing.assert_allclose(float(solver.net.blobs["loss"].data), traj[f"loss/{k}"],
                               rtol=RTOL, atol=ATOL, err_msg=f"loss after step {k}")
    for layer, blobs in solver.net.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_allclose(blob.data, traj[f"param/{k}/{layer}/{i}"], rtol=RTOL,
                                       atol=ATOL, err_msg=f"{layer}[{i}] after step {k}")


def _run(solver, feed, traj, first: int, last: int) -> None:
    """Steps ``first..last`` (1-based), one ``step(1)`` per feed, as the goldens were made."""
    for k in range(first, last + 1):
        _feed(solver, feed, k - 1)
        solver.step(1)
        assert solver.iter == k
        _check_step(solver, traj, k)


def _load(case_dir: Path):
    return np.load(case_dir / "feed.npz"), np.load(case_dir / "trajectory.npz")


@pytest.mark.parametrize("case", CASES)
def test_fresh_trajectory(case, tmp_path, monkeypatch):
    d = _case(tmp_path, case)
    monkeypatch.chdir(d)
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    feed, traj = _load(d)
    _run(solver, feed, traj, 1, STEPS)


@pytest.mark.parametrize("case", CASES)
def test_param_diff_after_step_is_the_update(case, tmp_path, monkeypatch):
    """Caffe leaves ComputeUpdateValue's result in each param's diff (SGD: the velocity), so
    after step k pycaffe's .diff is Caffe's param(k-1) - param(k)."""
    d = _case(tmp_path, case)
    monkeypatch.chdir(d)
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    feed, traj = _load(d)
    before = {layer: [b.data.copy() for b in blobs] for layer, blobs in solver.net.params.items()}
    for k in range(1, 6):
        _feed(solver, feed, k - 1)
        solver.step(1)
        for layer, blobs in solver.net.params.items():
            for i, blob in enumerate(blobs):
                prev = before[layer][i] if k == 1 else traj[f"param/{k - 1}/{layer}/{i}"]
                step = prev - traj[f"param/{k}/{layer}/{i}"]
                ulp = 4 * np.spacing(np.abs(prev).max())       # w - (w - u) loses ulps of w
                np.testing.assert_allclose(blob.diff, step, rtol=RTOL, atol=max(ATOL, ulp),
                                           err_msg=f"{layer}[{i}] diff after step {k}")
                assert np.abs(blob.diff).max() > 0 or np.abs(step).max() == 0


@pytest.mark.parametrize("case", CASES)
def test_resume_from_caffe_snapshot(case, tmp_path, monkeypatch):
    d = _case(tmp_path, case)
    monkeypatch.chdir(d)
    solver = caffe.get_solver("solver.prototxt")
    solver.restore("snap_iter_10.solverstate")
    assert solver.iter == 10
    feed, traj = _load(d)
    _run(solver, feed, traj, 11, STEPS)


@pytest.mark.parametrize("case", CASES)
def test_resume_from_other_directory(case, tmp_path, monkeypatch):
    """learned_net is stored relative ('snap_iter_10.caffemodel'): found beside the state."""
    d = _case(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    solver = caffe.get_solver(str(d / "solver.prototxt"))   # net path found beside the solver
    solver.restore(str(d / "snap_iter_10.solverstate"))
    feed, traj = _load(d)
    _run(solver, feed, traj, 11, 12)


@pytest.mark.parametrize("case", CASES)
def test_own_snapshot_matches_caffe_and_resumes(case, tmp_path, monkeypatch):
    d = _case(tmp_path, case)
    monkeypatch.chdir(d)
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from("init.caffemodel")
    feed, traj = _load(d)
    _run(solver, feed, traj, 1, 10)
    model, state_path = solver.snapshot()
    assert (model, state_path) == ("snap_iter_10.caffemodel", "snap_iter_10.solverstate")

    ours, theirs = caffe_pb2.SolverState(), caffe_pb2.SolverState()
    ours.ParseFromString(Path(state_path).read_bytes())
    theirs.ParseFromString((GOLDENS / case / "snap_iter_10.solverstate").read_bytes())
    assert ours.iter == theirs.iter == 10
    assert ours.learned_net == theirs.learned_net == "snap_iter_10.caffemodel"
    assert ours.current_step == theirs.current_step
    assert len(ours.history) == len(theirs.history)
    for i, (a, b) in enumerate(zip(ours.history, theirs.history)):
        assert list(a.shape.dim) == list(b.shape.dim), f"history {i} shape"
        np.testing.assert_allclose(np.asarray(a.data), np.asarray(b.data), rtol=RTOL, atol=ATOL,
                                   err_msg=f"history blob {i}")

    net = caffe_pb2.NetParameter()
    net.ParseFromString(Path(model).read_bytes())
    theirs_net = caffe_pb2.NetParameter()
    theirs_net.ParseFromString((GOLDENS / case / "snap_iter_10.caffemodel").read_bytes())
    assert [l.name for l in net.layer] == [l.name for l in theirs_net.layer]

    resumed = caffe.get_solver("solver.prototxt")
    resumed.restore(state_path)
    _run(resumed, feed, traj, 11, STEPS)


@pytest.mark.parametrize("case", ["sgd_step", "adam_exp"])
def test_hdf5_snapshot_roundtrip(case, tmp_path, monkeypatch):
    d = _case(tmp_path, case)
    monkeypatch.chdir(d)
    text = Path("solver.prototxt").read_text() + "\nsnapshot_format: HDF5\n"
    Path("solver_h5.prototxt").write_text(text)
    solver = caffe.get_solver("solver_h5.prototxt")
    solver.restore("snap_iter_10.solverstate")
    model, state_path = solver.snapshot()
    assert (model, state_path) == ("snap_iter_10.caffemodel.h5", "snap_iter_10.solverstate.h5")
    import h5py
    with h5py.File(state_path, "r") as f:
        assert int(f["iter"][0]) == 10
        assert f["learned_net"][()].decode() == model
        assert len(f["history"]) == len(solver.history)
    resumed = caffe.get_solver("solver_h5.prototxt")
    resumed.restore(state_path)
    feed, traj = _load(d)
    _run(resumed, feed, traj, 11, 13)


def test_typed_constructor_overrides_file_type(tmp_path, monkeypatch):
    d = _case(tmp_path, "adam_exp")
    monkeypatch.chdir(d)
    assert type(caffe.get_solver("solver.prototxt").rule).__name__ == "Adam"
    sgd = caffe.SGDSolver("solver.prototxt")
    assert type(sgd.rule).__name__ == "SGD" and len(sgd.history) == 6
