"""tools/full_fashion_mnist.py on fake IDX files: LMDBs, training, tests, report, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.data import open_db
from caffe_compat.formats.datum import decode_datum
from tool_utils import load_tool, write_idx

N_TRAIN, N_TEST = 48, 20


@pytest.fixture(scope="module")
def fake_idx(tmp_path_factory) -> Path:
    """48 train / 20 test 28×28 images: a bright square whose place depends on the class."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("idx")
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for img, label in zip(images, labels):
            r, c = divmod(int(label), 4)
            img[4 + 6 * r: 10 + 6 * r, 3 + 6 * c: 9 + 6 * c] = 220
        write_idx(d / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d


def run_tool(fake_idx: Path, tmp: Path, *extra: str) -> int:
    return load_tool("full_fashion_mnist").main([
        "--idx-dir", str(fake_idx), "--db", str(tmp / "db"), "--work", str(tmp / "work"),
        "--report", str(tmp / "report.md"), "--batch-size", "8", "--test-batch", "10",
        "--test-images", str(N_TEST), "--threads", "1", *extra])


def test_builds_trains_tests_and_reports(fake_idx, tmp_path, capsys):
    assert run_tool(fake_idx, tmp_path, "--max-iter", "12", "--test-every", "1",
                    "--precision", "bf16") == 0
    with open_db(tmp_path / "db" / "train") as db:
        assert len(db) == N_TRAIN
        key, value = db.first()
    image, label, landmarks = decode_datum(value)
    assert image.shape == (1, 72, 72) and label == 0
    assert landmarks.shape == (8, 3)                 # 8 silhouette landmarks (x, y, visible)
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["n_train"] == N_TRAIN and result["total_iterations"] == 12
    assert result["train"]["iterations"] == 12 and result["precision"] == "bf16"
    # one epoch = 48 / 8 = 6 iterations: a test at 6, and the final one at 12
    assert [t["iter"] for t in result["tests"]] == [6, 12]
    acc = result["test"]["accuracy"]
    assert 0 <= acc <= 1 and round(acc * N_TEST) == pytest.approx(acc * N_TEST, abs=1e-4)
    text = (tmp_path / "report.md").read_text()
    assert f"all {N_TRAIN} training / {N_TEST} test images" in text
    assert "bf16 autocast" in text and "94.5% target: not reached" in text
    # the caffemodel left behind scores what the bf16 run measured, reloaded in float32
    check = result["snapshot_check"]
    assert check["agrees"] and check["model"].endswith("_iter_12.caffemodel")
    assert abs(check["accuracy"] - acc) <= 2 / N_TEST + 1e-9
    assert "reloaded into a fresh TEST net" in text
    assert (tmp_path / "report.png").stat().st_size > 10_000
    weights = tmp_path / "work" / "vgg16_landmark_64_iter_12.caffemodel"
    assert weights.is_file()
    assert "snapshot:" in capsys.readouterr().out
    # the grey records' snapshot loads into the deploy written beside it (the model folder's
    # deploy declares 3 channels) and classifies a grey image
    import caffe_compat as caffe
    net = caffe.Net(str(tmp_path / "work" / "deploy.prototxt"), str(weights), caffe.TEST)
    assert net.blobs["data"].data.shape[:2] == (1, 1)
    assert net.params["conv1_1"][0].data.shape[1] == 1
    net.blobs["data"].data[...] = image[:, 4:68, 4:68]
    prob = next(v for k, v in net.forward().items() if v.size == 10)
    assert np.isclose(prob.sum(), 1, atol=1e-4)


def test_resume_keeps_the_curve_and_counts_all_iterations(fake_idx, tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(Path(load_tool("full_fashion_mnist").REPO /
                           "models/vgg16_landmark_64/solver_full.prototxt").read_text()
                      .replace("snapshot: 937", "snapshot: 4"))
    assert run_tool(fake_idx, tmp_path, "--solver", str(solver), "--max-iter", "8",
                    "--minutes", "0") == 0            # a zero budget: no training at all
    first = json.loads((tmp_path / "report.json").read_text())
    assert first["total_iterations"] == 0 and first["train"]["stopped_by_budget"]
    assert run_tool(fake_idx, tmp_path, "--solver", str(solver), "--max-iter", "5",
                    "--test-every", "0") == 0
    curve = json.loads((tmp_path / "work" / "curve.json").read_text())
    assert len(curve["train_loss"]) == 5
    assert run_tool(fake_idx, tmp_path, "--solver", str(solver), "--max-iter", "8",
                    "--resume", str(tmp_path / "work" / "vgg16_landmark_64_iter_4.solverstate"),
                    "--test-every", "0") == 0
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["train"]["start_iter"] == 4 and result["train"]["iterations"] == 4
    assert result["total_iterations"] == 8
    curve = json.loads((tmp_path / "work" / "curve.json").read_text())
    assert len(curve["train_loss"]) == 8            # 4 kept from before the snapshot + 4 new
    # the cost of the whole run: the 5-iteration invocation counts up to its snapshot
    # at 4 (the iteration after it was lost), then the resumed 4 iterations
    spans = [(s["start"], s["end"], s["threads"]) for s in result["segments"]]
    assert spans == [(0, 4, 1), (4, 8, 1)]
    report = (tmp_path / "report.md").read_text()
    assert "resumed at iteration 4" in report and "core-hours" in report
    assert "iterations 0–4:" in report and "iterations 4–8:" in report
    assert "Commands, in order" in report and report.count("--max-iter 5") == 1


def test_a_segment_past_the_resumed_snapshot_counts_pro_rata():
    tool = load_tool("full_fashion_mnist")
    seg = {"start": 100, "end": 300, "seconds": 50.0, "threads": 2}
    assert tool.clamp(seg, 200) == seg | {"end": 200, "seconds": 25.0}
    assert tool.clamp(seg, 300) == seg


def test_more_test_images_than_the_database_holds(fake_idx, tmp_path):
    with pytest.raises(SystemExit, match="holds only 20 records"):
        load_tool("full_fashion_mnist").main([
            "--idx-dir", str(fake_idx), "--db", str(tmp_path / "db"),
            "--work", str(tmp_path / "work"), "--report", str(tmp_path / "r.md"),
            "--test-images", "100"])


def test_curve_of_a_run_killed_before_its_curve_was_saved(tmp_path):
    tool = load_tool("full_fashion_mnist")
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"train_loss": [2.0, 1.0], "tests": [
        {"iter": 2, "accuracy": 0.5, "loss": 1.0}, {"iter": 9, "accuracy": 0.6, "loss": 0.9}]}))
    curve = tool.Curve(path, start_iter=5)       # the snapshot at 5 outlived the curve at 2
    assert curve.train_loss[:2] == [2.0, 1.0] and np.isnan(curve.train_loss[2:]).all()
    assert len(curve.train_loss) == 5 and [t["iter"] for t in curve.tests] == [2]
    from experiments.reproduce.scale_report import _smooth
    smooth = _smooth(curve.train_loss + [0.5], window=3)
    np.testing.assert_allclose(smooth[[0, 1, 5]], [2.0, 1.5, 0.5])   # NaNs skipped, not spread


def test_every_test_reads_the_same_first_images(fake_idx, tmp_path):
    tool = load_tool("full_fashion_mnist")
    assert run_tool(fake_idx, tmp_path, "--max-iter", "1", "--test-every", "0") == 0
    args = tool.parse_args(["--db", str(tmp_path / "db"), "--work", str(tmp_path / "w2"),
                            "--test-images", "10", "--test-batch", "10", "--batch-size", "8"])
    sp, net_path = tool.solver_param(args, tmp_path / "db", N_TRAIN, N_TEST)
    import caffe_compat
    solver = caffe_compat.get_solver(sp)
    first, second = (tool.test_once(solver, "loss", "accuracy") for _ in range(2))
    assert first["loss"] == second["loss"]        # images 0-9 both times, not 0-9 then 10-19


def test_precision_auto_and_layout_are_resolved_and_reported(fake_idx, tmp_path):
    import torch

    from caffe_compat.engine.precision import candidates
    assert run_tool(fake_idx, tmp_path, "--max-iter", "2", "--test-every", "0",
                    "--precision", "auto", "--layout", "nhwc") == 0
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["precision_flag"] == "auto" and result["layout"] == "nhwc"
    assert result["precision"] in ("fp32", "bf16")
    if not candidates(torch.device("cpu")):       # no native bf16: auto keeps fp32
        assert result["precision"] == "fp32"
    words = "float32" if result["precision"] == "fp32" else "bf16 autocast"
    assert f"{words} (--precision auto), nhwc layout" in result["machine"]


def test_layout_nhwc_stores_convolution_weights_channels_last():
    import types

    import torch

    from experiments.full_fashion_mnist import use_layout
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(4, 2))
    solver = types.SimpleNamespace(train_module=module, device=torch.device("cpu"))
    assert use_layout(solver, "nhwc", "fp32") == ("nhwc", "nhwc: --layout nhwc")
    weight = module[0].weight
    assert weight.shape == (8, 3, 3, 3) and not weight.is_contiguous()
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert use_layout(solver, "nchw", "fp32")[0] == "nchw" and weight.is_contiguous()


def test_snapshot_check_verdict_and_row():
    """The tolerance: a point on 10,000 images, two images on a small set; a gap beyond it
    is reported as a caffemodel that does not hold the tested weights."""
    from experiments.reproduce.snapshot_check import markdown_row, verdict
    ok = verdict({"accuracy": 0.9430}, 0.9422, 10_000)
    bad = verdict({"accuracy": 0.1140}, 0.9422, 10_000)
    small = verdict({"accuracy": 0.80}, 0.90, 20)
    assert ok["agrees"] and not bad["agrees"] and small["agrees"]
    assert not verdict({"accuracy": 0.75}, 0.90, 20)["agrees"]
    assert "agrees with the run's test" in markdown_row(ok)
    assert "differs from the run's 94.22%" in markdown_row(bad)


def test_padded_records_frame_the_resized_image_and_move_the_landmarks(fake_idx, tmp_path):
    import cv2

    from experiments.fashion_mnist import build_lmdbs, load
    from caffe_compat.data.landmarks import resize_landmarks, silhouette_landmarks
    plain, framed = tmp_path / "plain", tmp_path / "framed"
    build_lmdbs(fake_idx, plain, 32, color=False)
    build_lmdbs(fake_idx, framed, 40, color=False, pad=4)
    images, _ = load(fake_idx, "train")
    with open_db(plain / "train") as a, open_db(framed / "train") as b:
        (_, raw_a), (_, raw_b) = a.first(), b.first()
    (inner, _, _), (whole, _, landmarks) = decode_datum(raw_a), decode_datum(raw_b)
    assert whole.shape == (1, 40, 40)
    assert not whole[:, :4].any() and not whole[:, -4:].any()
    assert not whole[:, :, :4].any() and not whole[:, :, -4:].any()
    np.testing.assert_array_equal(whole[:, 4:36, 4:36], inner)
    np.testing.assert_array_equal(inner[0], cv2.resize(images[0], (32, 32)))
    expected = resize_landmarks(silhouette_landmarks(images[0]), (28, 28), (32, 32))
    expected[:, :2] += 4
    np.testing.assert_allclose(np.asarray(landmarks).reshape(-1, 3), expected)


def test_a_frame_wider_than_the_record_is_refused(fake_idx, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_tool(fake_idx, tmp_path, "--size", "36", "--pad", "18")
    assert "--pad 18" in capsys.readouterr().err
