"""``caffe.NCCL`` as BVLC's python/train.py drives it: a parent makes the uid, each process
declares its count and rank, builds an SGDSolver, joins with ``NCCL(solver, uid)``,
broadcasts, registers the callback (and ``after_backward`` for ``layer_wise_reduce``) and
steps. Two gloo processes with batch B must end where one process with batch 2B ends (Caffe
averages the diffs; rank r reads records r, r+2, ...)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_distributed import _train, _write_case
from test_distributed import lmdb_path  # noqa: F401  (the shared LMDB fixture)

ROOT = Path(__file__).resolve().parents[1]

# A multi-process trainer in the style of BVLC's python/train.py (our own script).
TRAINER = '''
import sys
from multiprocessing import Process

import numpy as np
import caffe


def timed(solver, nccl, seen):
    """train.py --timing: per-layer timers through the net's callbacks."""
    solver.net.before_forward(lambda layer: seen.append(("f", layer)))
    solver.net.after_backward(lambda layer: seen.append(("b", layer)))
    solver.add_callback(lambda: None, lambda: seen.append(("ready", solver.iter)))
    solver.add_callback(nccl)


def worker(solver_path, devices, timing, uid, rank, out):
    caffe.set_device(devices[rank])
    caffe.set_mode_gpu()                       # CAFFE_COMPAT_GPU_FALLBACK=cpu: the CPU
    caffe.set_solver_count(len(devices))
    caffe.set_solver_rank(rank)
    caffe.set_multiprocess(True)
    solver = caffe.SGDSolver(solver_path)
    nccl = caffe.NCCL(solver, uid)
    nccl.bcast()
    seen = []
    if timing and rank == 0:
        timed(solver, nccl, seen)
    else:
        solver.add_callback(nccl)
    if solver.param.layer_wise_reduce:
        solver.net.after_backward(nccl)
    solver.step(solver.param.max_iter)
    if rank == 0:
        weights = {"%s/%d" % (name, i): blob.data for name, blobs in solver.net.params.items()
                   for i, blob in enumerate(blobs)}
        np.savez(out, **weights)
        if timing:
            layers = len(solver.net.layers)
            assert seen.count(("ready", 0)) == 1, seen
            assert sum(1 for s in seen if s[0] == "f") == layers * solver.param.max_iter
            assert sum(1 for s in seen if s[0] == "b") == layers * solver.param.max_iter


if __name__ == "__main__":
    solver_path, out, timing = sys.argv[1], sys.argv[2], sys.argv[3] == "timing"
    uid = caffe.NCCL.new_uid()
    caffe.init_log()
    caffe.log("Using devices [0, 1]")
    procs = [Process(target=worker, args=(solver_path, [0, 1], timing, uid, rank, out))
             for rank in range(2)]
    for p in procs:
        p.daemon = True
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(p.exitcode for p in procs))
'''


def _run_trainer(tmp_path: Path, solver: str, out: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               CAFFE_COMPAT_GPU_FALLBACK="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), solver, str(out), mode], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["plain", "timing"])
def test_train_py_style_nccl_equals_one_process_with_the_combined_batch(tmp_path, lmdb_path,
                                                                         mode):
    single = _write_case(tmp_path / "single", lmdb_path, 8)
    _train(0, single, str(tmp_path / "single.npz"))
    double = _write_case(tmp_path / "nccl", lmdb_path, 4)
    done = _run_trainer(tmp_path, double, tmp_path / "nccl.npz", mode)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("computing on the CPU") == 2        # warned once per process
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "nccl.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_without_the_callback_the_processes_drift_apart(tmp_path, lmdb_path):
    """Guard for the guard: no averaging (no add_callback) does not reach the 2B result."""
    single = _write_case(tmp_path / "single", lmdb_path, 8)
    _train(0, single, str(tmp_path / "single.npz"))
    double = _write_case(tmp_path / "solo", lmdb_path, 4)
    script = TRAINER.replace("        solver.add_callback(nccl)\n", "        pass\n") \
                    .replace("        solver.net.after_backward(nccl)\n", "        pass\n")
    (tmp_path / "t.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CAFFE_COMPAT_GPU_FALLBACK="cpu",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(tmp_path / "t.py"), double,
                           str(tmp_path / "solo.npz"), "plain"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "solo.npz")
    assert any(not np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a.files)
