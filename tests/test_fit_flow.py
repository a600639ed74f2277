"""``caffe fit`` → bundle → ``caffe score`` / ``classify --bundle`` on data/fashion50 photos
(tiny: 3 classes, one or two epochs), and the bundle's preprocessing against the TEST Data
layer byte for byte."""
from __future__ import annotations

import csv
import json
import shutil
import signal

import numpy as np
import pytest

from caffe_compat.classifier import Classifier
from caffe_compat.commands import classify as classify_cmd, train as train_cli
from caffe_compat.engine.solver.events import IterationDone
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe import Net
from fit_utils import caffe, photo_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One fit of alexnet_64 on 3 classes × 8 images, one epoch, 40×40 stored images."""
    root = tmp_path_factory.mktemp("fit")
    photos = photo_folder(root / "photos", per_class=8)
    held = photo_folder(root / "held", per_class=4, start=20)
    assert caffe("fit", photos, "--model", "alexnet_64", "--out", root / "run", "--epochs", 1,
                 "--resize", 72, 72, "--progress", "never") == 0
    return {"root": root, "dir": root / "run", "photos": photos, "held": held}


def test_fit_writes_the_run_folder(run):
    out = run["dir"]
    record = json.loads((out / "fit.json").read_text())
    assert record["status"] == "done" and 0 <= record["val_accuracy"] <= 1
    assert record["iterations"] == record["plan"]["max_iter"] == 5      # 18 images / batch 4
    for rel in ("dataset/dataset.json", "dataset/train_lmdb", "train_val.prototxt",
                "solver.prototxt", "train.log", "snapshots/fit.metrics.jsonl",
                "snapshots/fit.png", "bundle/deploy.prototxt", "bundle/weights.caffemodel",
                "bundle/labels.txt", "bundle/preprocess.json", "bundle/mean.binaryproto",
                "bundle/README.md"):
        assert (out / rel).exists(), rel
    net = read_text_proto(str(out / "train_val.prototxt"), caffe_pb2.NetParameter)
    fc8 = next(layer for layer in net.layer if layer.name == "fc8")
    assert fc8.inner_product_param.num_output == 3
    assert "Optimization Done" in (out / "train.log").read_text()
    metrics = [json.loads(line) for line in (out / "snapshots/fit.metrics.jsonl").open()]
    assert any("accuracy" in json.dumps(m) for m in metrics)
    card = (out / "bundle/README.md").read_text()
    assert "bag, sandal, trouser" in card and f"{record['val_accuracy']:.4f}" in card
    assert record["command"].startswith("caffe fit ") and "--model alexnet_64" in card


def test_bundle_blobs_equal_the_test_data_layer(run):
    """The same float32 bytes for the same image: Data layer (LMDB, mean file, centre crop,
    scale) vs the bundle's preprocessing of the original file."""
    out = run["dir"]
    net = Net(str(out / "train_val.prototxt"), caffe_pb2.TEST)
    net.forward()
    fed = net.blobs["data"].data.copy()
    clf = Classifier.from_bundle(out / "bundle")
    val = [line.rsplit(" ", 1)[0] for line in (out / "dataset/val.txt").read_text().splitlines()]
    mine = np.stack([clf.blob(run["photos"] / rel) for rel in val[:len(fed)]])
    assert len(fed) == len(val) == 6
    assert mine.dtype == np.float32 and mine.tobytes() == fed.tobytes()


def test_top_k_on_paths_and_arrays(run):
    import cv2
    clf = Classifier.from_bundle(run["dir"] / "bundle")
    path = next((run["held"] / "sandal").iterdir())
    top = clf.top_k(path, k=3)
    assert [label for label, _ in top] and {label for label, _ in top} == {"bag", "sandal",
                                                                           "trouser"}
    assert abs(sum(p for _, p in top) - 1) < 1e-5
    assert clf.top_k(cv2.imread(str(path)), k=3) == top                  # OpenCV array
    from caffe_compat import io as caffe_io
    assert np.allclose(clf.predict([caffe_io.load_image(str(path))])[0],
                       clf.probabilities([path])[0])                     # pycaffe's input
    from caffe_compat.commands.bundle import top_k
    assert top_k(run["dir"] / "bundle", path, k=2) == top[:2]           # the cached helper
    assert top_k(run["dir"] / "bundle", str(path), k=3) == top


def test_score_json_and_files(run, capsys, tmp_path):
    assert caffe("score", "--bundle", run["dir"] / "bundle", run["held"], "--json", "--out",
                 tmp_path / "s") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12 and 0 <= summary["accuracy"] <= 1
    matrix = np.array(summary["confusion"])
    assert matrix.sum() == 12 and summary["correct"] == np.trace(matrix)
    assert summary["accuracy"] == pytest.approx(np.trace(matrix) / 12)
    for name, row in summary["per_class"].items():
        i = summary["labels"].index(name)
        assert row["support"] == 4 and row["recall"] == pytest.approx(matrix[i, i] / 4)
    rows = list(csv.reader((tmp_path / "s/confusion.csv").open()))
    assert rows[0][1:] == summary["labels"] and [int(v) for v in rows[1][1:]] == list(matrix[0])
    assert (tmp_path / "s/confusion.png").stat().st_size > 1000
    assert (tmp_path / "s/mistakes.png").is_file()
    clf = Classifier.from_bundle(run["dir"] / "bundle")
    paths = sorted(run["held"].glob("*/*.png"))
    predicted = clf.probabilities(paths).argmax(1)
    truth = [summary["labels"].index(p.parent.name) for p in paths]
    assert summary["correct"] == int(np.sum(predicted == truth))


def test_score_list_with_names_and_indices(run, capsys, tmp_path):
    listing = tmp_path / "list.txt"
    images = sorted(run["held"].glob("*/*.png"))
    listing.write_text("".join(f"{p} {p.parent.name if i % 2 else ['bag', 'sandal', 'trouser'].index(p.parent.name)}\n"
                               for i, p in enumerate(images)))
    assert caffe("score", "--bundle", run["dir"] / "bundle", listing, "--json", "--out",
                 tmp_path / "s") == 0
    assert json.loads(capsys.readouterr().out)["images"] == len(images)


def test_classify_bundle_names_labels(run, capsys):
    image = next((run["held"] / "trouser").iterdir())
    assert classify_cmd.main([str(image), "--bundle", str(run["dir"] / "bundle"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result[0]["top"][0]["label"] in ("bag", "sandal", "trouser")
    assert classify_cmd.main([str(run["held"] / "bag"), "--bundle",
                              str(run["dir"] / "bundle"), "--top_k", "1"]) == 0
    assert capsys.readouterr().out.count("\n") == 2 * 4


def test_finetune_renames_the_classifier(run, tmp_path):
    out = tmp_path / "ft"
    assert caffe("fit", run["dir"] / "dataset", "--model", "alexnet_64", "--out", out,
                 "--epochs", 1, "--weights", run["dir"] / "bundle/weights.caffemodel",
                 "--progress", "never") == 0
    net = read_text_proto(str(out / "train_val.prototxt"), caffe_pb2.NetParameter)
    new = next(layer for layer in net.layer if layer.name == "fc8_fit")
    assert [p.lr_mult for p in new.param] == [10, 20]
    solver = read_text_proto(str(out / "solver.prototxt"), caffe_pb2.SolverParameter)
    assert solver.base_lr == pytest.approx(0.001)
    assert not (out / "dataset").exists()                  # a DATASET is used in place
    assert json.loads((out / "fit.json").read_text())["status"] == "done"


def test_sigint_stops_with_a_snapshot_and_resume_finishes(run, tmp_path, monkeypatch):
    base = train_cli.Solver

    class Interrupted(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.subscribe(lambda s: s.iter == 2 and not self.sent and self._send(), IterationDone)
            self.sent = False

        def _send(self):
            self.sent = True
            import os
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_cli, "Solver", Interrupted)
    out = tmp_path / "stop"
    argv = ["fit", run["dir"] / "dataset", "--model", "alexnet_64", "--out", out, "--epochs", 1,
            "--progress", "never"]
    assert caffe(*argv) == 0
    record = json.loads((out / "fit.json").read_text())
    assert record["status"] == "stopped" and record["iterations"] == 2
    assert "--resume" in record["resume"] and not (out / "bundle").exists()
    monkeypatch.setattr(train_cli, "Solver", base)
    assert caffe(*argv, "--resume", "--epochs", 2) == 0
    record = json.loads((out / "fit.json").read_text())
    assert record["status"] == "done" and record["iterations"] == 10
    assert "Resuming from" in (out / "train.log").read_text()
    shutil.rmtree(out / "bundle")
    assert caffe(*argv, "--resume", "--epochs", 2) == 0        # nothing left to train
    record = json.loads((out / "fit.json").read_text())
    assert record["status"] == "done" and record["weights"].endswith("fit_iter_10.caffemodel")
    assert (out / "bundle/weights.caffemodel").is_file()


def test_score_of_the_val_list_equals_the_training_test(run, capsys, tmp_path):
    """The bundle scores the validation list exactly as the TEST net did at the last test."""
    out = run["dir"]
    assert caffe("score", "--bundle", out / "bundle", out / "dataset/val.txt", "--json",
                 "--out", tmp_path / "s") == 0
    summary = json.loads(capsys.readouterr().out)
    record = json.loads((out / "fit.json").read_text())
    assert summary["images"] == 6
    assert summary["accuracy"] == pytest.approx(record["val_accuracy"], abs=1e-6)


def test_classify_a_labelled_list_reports_accuracy(run, capsys, tmp_path):
    images = sorted(run["held"].glob("*/*.png"))
    listing = tmp_path / "held.txt"
    listing.write_text("".join(f"{p} {['bag', 'sandal', 'trouser'].index(p.parent.name)}\n"
                               for p in images))
    clf = Classifier.from_bundle(run["dir"] / "bundle")
    hits = int(np.sum(clf.probabilities(images).argmax(1) ==
                      [["bag", "sandal", "trouser"].index(p.parent.name) for p in images]))
    assert classify_cmd.main([str(listing), "--bundle", str(run["dir"] / "bundle")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"accuracy {hits / 12:.4f} ({hits}/12 listed labels)"


def test_a_fine_tuning_model_starts_from_its_own_solvers_weights(run, tmp_path, capsys):
    """models/*_finetune name their pretrained caffemodel in the solver (weights:): fit
    fine-tunes from it at the model's own rate (not a tenth of it again), and says what to
    do when it is missing."""
    from caffe_compat.commands.model_library import MODELS
    model = tmp_path / "models" / "alexnet_64_finetune"
    shutil.copytree(MODELS / "alexnet_64_finetune", model)
    argv = ["fit", run["dir"] / "dataset", "--model", model, "--out", tmp_path / "ft",
            "--epochs", 1, "--progress", "never"]
    assert caffe(*argv) == 1
    assert "alexnet_64_pretrained.caffemodel, which does not exist" in capsys.readouterr().err
    pretrained = tmp_path / "runs/pretrain/alexnet_64/alexnet_64_pretrained.caffemodel"
    pretrained.parent.mkdir(parents=True)
    shutil.copyfile(run["dir"] / "bundle/weights.caffemodel", pretrained)
    assert caffe(*argv) == 0
    solver = read_text_proto(str(tmp_path / "ft/solver.prototxt"), caffe_pb2.SolverParameter)
    assert list(solver.weights) == [str(pretrained.resolve())]
    assert solver.base_lr == pytest.approx(0.001)                  # the model's solver's
    log = (tmp_path / "ft/train.log").read_text()      # every layer but the new classifier
    assert "keep their initial values: fc8_fashion50_fit" in log
