"""Bundles from ``caffe train`` runs, ONNX export of a bundle, and every bad input the issue
names: weights that leave layers unfilled, a mean of another size, a short labels file, a
bundle with a file missing, unknown classes and labels when scoring, fit's bad options."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from caffe_compat.classifier import Classifier
from caffe_compat.commands import classify as classify_cmd, export as export_cmd
from caffe_compat.commands.dataset import build_dataset
from caffe_compat.formats.blob_io import write_blobproto
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe import Net
from fit_utils import caffe, photo_folder

NET = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.02 mean_value: 100 mean_value: 110 mean_value: 120 mirror: true }}
  data_param {{ source: "{train}" backend: LMDB batch_size: 6 }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.02 mean_value: 100 mean_value: 110 mean_value: 120 }}
  data_param {{ source: "{val}" backend: LMDB batch_size: 6 }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 4 kernel_size: 3 stride: 2 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "score" type: "InnerProduct" bottom: "conv" top: "score"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "acc"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A `caffe train` run (mean values, no crop) on a caffe dataset, then `caffe bundle`."""
    root = tmp_path_factory.mktemp("train")
    photos = photo_folder(root / "photos", per_class=4)
    data = root / "data"
    build_dataset(photos, data, resize=(20, 24), per_class="2/2")
    (root / "net.prototxt").write_text(NET.format(train=data / "train_lmdb",
                                                  val=data / "val_lmdb"))
    (root / "solver.prototxt").write_text(
        f'net: "{root / "net.prototxt"}"\ntest_iter: 1\ntest_interval: 4\nbase_lr: 0.01\n'
        f'lr_policy: "fixed"\nmax_iter: 4\nsnapshot_prefix: "{root / "snap/run"}"\n')
    assert caffe("train", "--solver", root / "solver.prototxt", "--no-plot",
                 "--progress", "never") == 0
    weights = root / "snap/run_iter_4.caffemodel"
    assert caffe("bundle", "--solver", root / "solver.prototxt", "--weights", weights,
                 "--out", root / "bundle") == 0
    return {"root": root, "photos": photos, "data": data, "weights": weights,
            "bundle": root / "bundle"}


def test_bundle_from_a_train_run(trained):
    spec = json.loads((trained["bundle"] / "preprocess.json").read_text())
    assert spec["resize"] == [20, 24] and spec["crop"] == 0 and spec["mean_file"] is None
    assert spec["mean_values"] == [100, 110, 120] and spec["scale"] == pytest.approx(0.02)
    assert spec["input_shape"] == [1, 3, 20, 24]
    assert not (trained["bundle"] / "mean.binaryproto").exists()
    assert (trained["bundle"] / "labels.txt").read_text() == "bag\nsandal\ntrouser\n"
    net = Net(str(trained["root"] / "net.prototxt"), caffe_pb2.TEST)
    net.forward()
    clf = Classifier.from_bundle(trained["bundle"])
    val = [line.rsplit(" ", 1)[0] for line in (trained["data"] / "val.txt").read_text().split("\n")
           if line]
    mine = np.stack([clf.blob(trained["photos"] / rel) for rel in val])
    assert mine.tobytes() == net.blobs["data"].data.tobytes()
    deploy = Net(str(trained["bundle"] / "deploy.prototxt"), caffe_pb2.TEST)
    assert deploy.outputs == ["prob"] and "label" not in deploy.blobs


def test_export_bundle_carries_labels_and_preprocessing(trained, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    assert export_cmd.main(["--bundle", str(trained["bundle"]), "--format", "onnx",
                            str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["caffe.labels"]) == ["bag", "sandal", "trouser"]
    assert json.loads(meta["caffe.preprocess"])["mean_values"] == [100, 110, 120]
    assert export_cmd.main(["--bundle", str(trained["bundle"]), "--model", "x",
                            "--format", "onnx", str(out)]) == 1
    assert "--bundle gives the model" in capsys.readouterr().err


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "b")


def test_short_labels_file_is_an_error(trained, tmp_path, capsys):
    bundle = _copy(trained["bundle"], tmp_path)
    (bundle / "labels.txt").write_text("bag\nsandal\n")
    with pytest.raises(ValueError, match="2 label.* but the net has 3 outputs"):
        Classifier.from_bundle(bundle)
    image = next((trained["photos"] / "bag").iterdir())
    assert classify_cmd.main([str(image), "--bundle", str(bundle)]) == 1
    assert "labels.txt: 2 label(s)" in capsys.readouterr().err
    assert classify_cmd.main([str(image), "--model_def", str(bundle / "deploy.prototxt"),
                              "--pretrained_model", str(bundle / "weights.caffemodel"),
                              "--labels", str(bundle / "labels.txt"), "--images_dim", "20,24",
                              "--center_only"]) == 1
    assert "2 label(s) but the net has 3 outputs" in capsys.readouterr().err


def test_mean_of_another_size_names_both(trained, tmp_path, capsys):
    bundle = _copy(trained["bundle"], tmp_path)
    spec = json.loads((bundle / "preprocess.json").read_text())
    spec.update(mean_file="mean.binaryproto", mean_values=None)
    (bundle / "preprocess.json").write_text(json.dumps(spec))
    write_blobproto(bundle / "mean.binaryproto", np.zeros((1, 3, 10, 10), np.float32))
    with pytest.raises(ValueError, match="mean is 3×10×10 but the images are 3×20×24"):
        Classifier.from_bundle(bundle)
    image = next((trained["photos"] / "bag").iterdir())
    assert classify_cmd.main([str(image), "--model_def", str(bundle / "deploy.prototxt"),
                              "--pretrained_model", str(bundle / "weights.caffemodel"),
                              "--mean_file", str(bundle / "mean.binaryproto")]) == 1
    err = capsys.readouterr().err
    assert "3×10×10" in err and "256×256" in err and "20×24" in err


def test_missing_weights_refused_unless_allowed(trained, tmp_path, capsys):
    bundle = _copy(trained["bundle"], tmp_path)
    text = (bundle / "deploy.prototxt").read_text().replace('name: "score"', 'name: "score2"')
    (bundle / "deploy.prototxt").write_text(text)
    with pytest.raises(ValueError, match="score2"):
        Classifier.from_bundle(bundle)
    assert Classifier.from_bundle(bundle, allow_missing_weights=True).labels
    image = str(next((trained["photos"] / "bag").iterdir()))
    argv = [image, "--model_def", str(bundle / "deploy.prototxt"), "--pretrained_model",
            str(bundle / "weights.caffemodel"), "--images_dim", "20,24", "--center_only"]
    assert classify_cmd.main(argv) == 1
    assert "would run on random initial values: score2" in capsys.readouterr().err
    assert classify_cmd.main(argv + ["--allow-missing-weights"]) == 0
    assert classify_cmd.main([image, "--bundle", str(bundle)]) == 1
    net = trained["root"] / "renamed.prototxt"
    net.write_text((trained["root"] / "net.prototxt").read_text()
                   .replace('name: "score"', 'name: "score2"'))
    test = ["test", "--model", net, "--weights", trained["weights"], "--iterations", 1]
    assert caffe(*test) == 1
    assert "score2" in capsys.readouterr().err
    assert caffe(*test, "--allow-missing-weights") == 0


def test_bundle_missing_a_file(trained, tmp_path, capsys):
    bundle = _copy(trained["bundle"], tmp_path)
    (bundle / "weights.caffemodel").unlink()
    assert caffe("score", "--bundle", bundle, trained["photos"]) == 1
    assert "weights.caffemodel: missing from the model bundle" in capsys.readouterr().err
    assert classify_cmd.main(["x.png", "--bundle", str(tmp_path / "nowhere")]) == 1
    assert "no such model bundle folder" in capsys.readouterr().err


def test_score_bad_inputs(trained, tmp_path, capsys):
    folder = photo_folder(tmp_path / "p", classes=("bag", "coat"), per_class=1)
    assert caffe("score", "--bundle", trained["bundle"], folder) == 1
    assert "no class 'coat' in the bundle's labels" in capsys.readouterr().err
    listing = tmp_path / "l.txt"
    listing.write_text(f"{next((folder / 'bag').iterdir())} 7\n")
    assert caffe("score", "--bundle", trained["bundle"], listing) == 1
    assert "l.txt:1: label '7'" in capsys.readouterr().err
    shutil.rmtree(folder / "coat")
    (folder / "bag" / "bad.png").write_bytes(b"nope")
    assert caffe("score", "--bundle", trained["bundle"], folder, "--json", "--out",
                 tmp_path / "s") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 1 and summary["skipped"][0]["path"].endswith("bad.png")


def test_bundle_without_labels_asks_for_them(trained, tmp_path, capsys):
    (trained["data"] / "labels.txt").rename(tmp_path / "labels.txt")
    try:
        assert caffe("bundle", "--solver", trained["root"] / "solver.prototxt", "--weights",
                     trained["weights"], "--out", tmp_path / "b") == 1
        assert "pass --labels FILE" in capsys.readouterr().err
        assert caffe("bundle", "--solver", trained["root"] / "solver.prototxt", "--weights",
                     trained["weights"], "--out", tmp_path / "b", "--labels",
                     tmp_path / "labels.txt") == 0
    finally:
        (tmp_path / "labels.txt").rename(trained["data"] / "labels.txt")


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no_such_model"], "neither a prototxt file nor a model folder"),
    (["--model", "alexnet_64", "--epochs", "0"], "--epochs must be at least 1"),
    (["--model", "alexnet_64", "--resume", "--weights", "w"], "give one"),
    (["--model", "alexnet_64", "--weights", "nowhere.caffemodel"], "no such file"),
    (["--model", "alexnet_64", "--resize", "40", "40"], "crops 64×64 but the data set stores "
                                                        "40×40"),
])
def test_fit_bad_options(trained, tmp_path, capsys, argv, needle):
    assert caffe("fit", trained["photos"], "--out", tmp_path / "run", *argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_fit_dataset_refuses_split_options(trained, tmp_path, capsys):
    assert caffe("fit", trained["data"], "--model", "alexnet_64", "--out", tmp_path / "r",
                 "--resize", 72, 72) == 1
    assert "is a built data set" in capsys.readouterr().err


def test_fit_args_for_python_callers(tmp_path):
    from caffe_compat.commands.common import CliError
    from caffe_compat.commands.fit import fit_args
    args = fit_args("photos", tmp_path / "r", "alexnet_64", epochs=3, precision="bf16")
    assert (args.source, args.model, args.epochs, args.precision) == ("photos", "alexnet_64", 3,
                                                                       "bf16")
    with pytest.raises(CliError, match="no option"):
        fit_args("photos", tmp_path / "r", "alexnet_64", bogus=1)


def test_threads_choice(monkeypatch):
    from caffe_compat.commands.common import CliError
    from caffe_compat.commands.fit import choose_threads
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert choose_threads("3") == 3
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 5.0, 5.0))
    assert choose_threads("auto") == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.2, 0.2))
    assert choose_threads("auto") == 2
    with pytest.raises(CliError, match="--threads 0"):
        choose_threads("0")


def test_fit_a_user_prototxt_keeps_its_preprocessing(trained, tmp_path):
    """A train_val of the user's (mean_value, no crop, no solver beside it) is pointed at the
    new data and keeps its own mean; the bundle records exactly that."""
    model = tmp_path / "mine" / "train_val.prototxt"
    model.parent.mkdir()
    model.write_text(NET.format(train="elsewhere/train", val="elsewhere/val"))
    out = tmp_path / "run"
    assert caffe("fit", trained["photos"], "--model", model, "--out", out, "--epochs", 1,
                 "--resize", 20, 24, "--val-percent", 50, "--progress", "never") == 0
    spec = json.loads((out / "bundle/preprocess.json").read_text())
    assert spec["mean_values"] == [100, 110, 120] and spec["mean_file"] is None
    assert spec["input_shape"] == [1, 3, 20, 24] and not (out / "bundle/mean.binaryproto").exists()
    from caffe_compat.formats.blob_io import read_text_proto
    solver = read_text_proto(str(out / "solver.prototxt"), caffe_pb2.SolverParameter)
    record = json.loads((out / "fit.json").read_text())
    assert (solver.base_lr, solver.momentum) == (pytest.approx(0.01), pytest.approx(0.9))
    assert solver.max_iter == record["plan"]["max_iter"] == record["iterations"]
    assert record["status"] == "done" and record["plan"]["train_batch"] == 4
