"""Data-parallel training: 2 gloo processes with batch B equal 1 process with batch 2B."""
import functools
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DATA = Path(__file__).parent / "goldens" / "data"

NET = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.00390625 }
        data_param { source: "%(db)s" backend: LMDB batch_size: %(batch)d } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 5 stride: 2
                            weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """net: "%(net)s"
base_lr: 0.1 momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed"
max_iter: 6 display: 0 snapshot: 0 snapshot_after_train: false random_seed: 7
"""


def _write_case(folder: Path, db: str, batch: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.prototxt").write_text(NET % {"db": db, "batch": batch})
    (folder / "solver.prototxt").write_text(SOLVER % {"net": folder / "net.prototxt"})
    return str(folder / "solver.prototxt")


def _train(rank: int, solver_path: str, out: str) -> None:
    import caffe_compat as caffe
    solver = caffe.get_solver(solver_path)
    solver.solve()
    if rank == 0:
        np.savez(out, **{f"{n}/{i}": b.data for n, bs in solver.net.params.items()
                         for i, b in enumerate(bs)})


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory):
    from caffe_compat.data.convert import convert_imageset
    db = tmp_path_factory.mktemp("db") / "train_lmdb"
    convert_imageset(str(GOLDEN_DATA / "images") + "/", str(GOLDEN_DATA / "list.txt"), str(db),
                     gray=True, backend="lmdb")
    return str(db)


def test_two_gloo_processes_equal_one_with_double_batch(tmp_path, lmdb_path):
    from caffe_compat.engine import distributed
    single = _write_case(tmp_path / "single", lmdb_path, 8)
    _train(0, single, str(tmp_path / "single.npz"))
    double = _write_case(tmp_path / "dp", lmdb_path, 4)
    distributed.launch(functools.partial(_train, solver_path=double, out=str(tmp_path / "dp.npz")),
                       devices=[None, None])
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "dp.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert any(np.abs(a[k]).sum() > 0 for k in a.files)


def test_train_cli_runs_data_parallel_cpu_processes(tmp_path, lmdb_path, capsys):
    """`tools/train.py --cpu-procs 2` (the --gpu 0,1 code path): one log and snapshot, by rank 0."""
    from caffe_compat.commands.train import add_arguments, main
    import argparse
    solver = _write_case(tmp_path / "cli", lmdb_path, 4)
    text = Path(solver).read_text().replace("snapshot: 0 snapshot_after_train: false",
                                            f'snapshot: 3 snapshot_prefix: "{tmp_path}/snap/tiny"')
    Path(solver).write_text(text.replace("display: 0", "display: 1"))
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert main(ap.parse_args(["--solver", solver, "--cpu-procs", "2", "--no-plot"])) == 0
    snaps = sorted(p.name for p in (tmp_path / "snap").iterdir())
    assert snaps == ["tiny.log", "tiny.metrics.jsonl", "tiny_iter_3.caffemodel", "tiny_iter_3.solverstate",
                     "tiny_iter_6.caffemodel", "tiny_iter_6.solverstate"]
    log = (tmp_path / "snap" / "tiny.log").read_text()
    assert "Data-parallel training over 2 processes" in log
    assert log.count("Iteration 5 (") == 1            # only the root logs its iterations


def _decide(rank: int, out: str) -> None:
    import torch
    from caffe_compat.engine import distributed
    got = distributed.decided_by_root(lambda: {"layout": "nhwc" if rank == 0 else "nchw"})
    Path(out, f"{rank}.txt").write_text(f"{got['layout']} {torch.get_num_threads()}")


def test_workers_agree_on_probe_decisions_and_share_the_threads(tmp_path):
    """--precision/--layout auto time a probe; each rank timing its own could split the group.
    And N processes on one machine share its threads (N full pools oversubscribe the cores)."""
    import torch
    from caffe_compat.engine import distributed
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        distributed.launch(functools.partial(_decide, out=str(tmp_path)), [None, None])
    finally:
        torch.set_num_threads(before)
    assert [(tmp_path / f"{r}.txt").read_text() for r in (0, 1)] == ["nhwc 2", "nhwc 2"]
