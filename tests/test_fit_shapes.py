"""``caffe fit``'s defaults for small folders (batch, schedule) and the owner's acceptance
flow on 120 generated shape photos: fit 10 epochs → score held-out photos → classify."""
from __future__ import annotations

import json

import pytest

from caffe_compat.commands import classify as classify_cmd, fit as fit_cmd
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2
from fit_utils import caffe, shapes_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {"root": root, "train": shapes_folder(root / "train", per_class=40, seed=1),
            "held": shapes_folder(root / "held", per_class=20, seed=2)}


def _solver(out):
    return read_text_proto(str(out / "solver.prototxt"), caffe_pb2.SolverParameter)


def test_small_folder_gets_small_batches_and_a_decaying_rate(shapes):
    out = shapes["root"] / "plan"
    fit_cmd.prepare(fit_cmd.fit_args(shapes["train"], out, "alexnet_64", epochs=10), out)
    record = json.loads((out / "fit.json").read_text())
    # 120 photos, 20% held back for validation: 96 to train, batch 4 → 24 updates per epoch
    assert record["plan"] == {"train_batch": 4, "iterations_per_epoch": 24, "max_iter": 240,
                              "test_batch": 24, "test_iter": 1}
    solver = _solver(out)
    assert (solver.lr_policy, solver.power) == ("poly", 1.0)
    assert solver.base_lr == pytest.approx(0.01)
    assert solver.type == "SGD" and solver.momentum == pytest.approx(0.9)
    assert solver.clip_gradients == pytest.approx(10.0)     # alexnet_64's solver sets none


def test_batch_and_rate_overrides_win(shapes):
    out = shapes["root"] / "override"
    args = fit_cmd.fit_args(shapes["root"] / "plan" / "dataset", out, "alexnet_64", epochs=2,
                            batch_size=16, base_lr=0.002, solver_type="Adam")
    fit_cmd.prepare(args, out)
    plan = json.loads((out / "fit.json").read_text())["plan"]
    assert (plan["train_batch"], plan["iterations_per_epoch"], plan["max_iter"]) == (16, 6, 12)
    solver = _solver(out)
    assert (solver.type, solver.lr_policy) == ("Adam", "poly")
    assert solver.base_lr == pytest.approx(0.002)


def test_acceptance_flow_on_shapes(shapes, capsys):
    """The owner's check: 3 shape classes × 40 photos, alexnet_64 from scratch, 10 epochs,
    then ≥ 0.9 on 60 photos it never saw (1.0 measured; ~15 s on one thread)."""
    out = shapes["root"] / "run"
    assert caffe("fit", shapes["train"], "--model", "alexnet_64", "--out", out, "--epochs", 10,
                 "--threads", 1, "--progress", "never") == 0
    capsys.readouterr()
    assert caffe("score", "--bundle", out / "bundle", shapes["held"], "--json",
                 "--out", shapes["root"] / "score") == 0
    score = json.loads(capsys.readouterr().out)
    assert score["images"] == 60 and score["accuracy"] >= 0.9, score["confusion"]
    image = shapes["held"] / "triangle" / "triangle_000.jpg"
    assert classify_cmd.main([str(image), "--bundle", str(out / "bundle"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["label"] == "triangle"
