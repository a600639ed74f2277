"""The fine-tuned protocol's pretraining data never contains an image of data/fashion50.

Every 40/10 split (train and test images alike) is drawn from data/fashion50, whose files are
named by their Fashion-MNIST training-set index. The proof has two links: (1) those names are
the IDX indices — each PNG equals the IDX image at its index (needs the real IDX files, from
``apt-get install dataset-fashion-mnist``); (2) the pretraining LMDB builder leaves out exactly
those indices — checked on an IDX set that holds the fashion50 PNGs at their own indices among
other images, by pixel content, not by key.
"""
from __future__ import annotations

import gzip
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from caffe_compat.data.db import open_db
from caffe_compat.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import pretrain  # noqa: E402
from experiments.defaults import CLASSES  # noqa: E402
from experiments.fashion_mnist import build_lmdbs, load  # noqa: E402

FASHION50 = ROOT / "data" / "fashion50"
REAL_IDX = Path("/usr/share/datasets/fashion-mnist")


def _fashion50_images() -> dict[int, tuple[np.ndarray, int]]:
    out = {}
    for png in FASHION50.glob("*/*.png"):
        out[int(png.stem)] = (cv2.imread(os.fspath(png), cv2.IMREAD_GRAYSCALE),
                              CLASSES.index(png.parent.name))
    return out


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_indices_cover_every_fashion50_image():
    indices = pretrain.fashion50_indices(FASHION50)
    assert len(indices) == len(list(FASHION50.glob("*/*.png"))) == 500


def test_a_misnamed_image_is_refused(tmp_path):
    (tmp_path / "coat").mkdir()
    (tmp_path / "coat" / "copy of 12.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not named <index>.png"):
        pretrain.fashion50_indices(tmp_path)


@pytest.mark.skipif(not (REAL_IDX / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST IDX files not installed (dataset-fashion-mnist)")
def test_fashion50_names_are_the_idx_indices():
    images, labels = load(REAL_IDX, "train")
    for index, (img, label) in _fashion50_images().items():
        assert np.array_equal(images[index], img), index
        assert labels[index] == label, index


def test_pretraining_lmdb_holds_no_fashion50_image(tmp_path):
    """Fashion50's PNGs at their indices among random images; none may reach the LMDB."""
    known = _fashion50_images()
    total = max(known) + 40
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (total, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, total, dtype=np.uint8)
    for index, (img, label) in known.items():
        images[index], labels[index] = img, label
    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte", images)
    _write_idx(idx / "train-labels-idx1-ubyte", labels)
    _write_idx(idx / "t10k-images-idx3-ubyte", images[:5])
    _write_idx(idx / "t10k-labels-idx1-ubyte", labels[:5])
    db = tmp_path / "db"
    build_lmdbs(idx, db, 72, color=True, exclude_train=pretrain.fashion50_indices(FASHION50))
    forbidden = {np.repeat(cv2.resize(img, (72, 72))[None], 3, 0).tobytes()
                 for img, _ in known.values()}
    seen = []
    with open_db(db / "train") as reader:
        for key, value in reader.items():
            datum = caffe_pb2.Datum.FromString(value)
            assert datum.data not in forbidden, key
            seen.append(pretrain.record_index(key))
    assert sorted(seen) == sorted(set(range(total)) - set(known))
    assert len(seen) == total - 500


def test_an_idx_set_holding_only_fashion50_images_is_refused_in_one_line(tmp_path):
    images = np.zeros((30, 28, 28), np.uint8)
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.zeros(30, np.uint8))
    with pytest.raises(ValueError, match="no train image left to write"):
        build_lmdbs(tmp_path, tmp_path / "db", 72, color=True,
                    exclude_train=pretrain.fashion50_indices(FASHION50))


def test_finetune_folders_are_what_the_generator_writes(tmp_path):
    """models/*_finetune*: the base net with fc8 renamed (lr_mult 10/20), solver weights set."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_finetune_models as gen
    for folder, (base, weight) in gen.FOLDERS.items():
        base_net = (ROOT / "models" / base / "train_val.prototxt").read_text(encoding="utf-8")
        ours = (ROOT / "models" / folder / "train_val.prototxt").read_text(encoding="utf-8")
        assert ours.split("\n", 1)[1] == gen.finetune_net(base_net, weight), folder
        assert '"fc8"' not in ours and "lr_mult: 10" in ours
        solver = (ROOT / "models" / folder / "solver.prototxt").read_text(encoding="utf-8")
        weights = re.search(r'weights: "([^"]+)"', solver).group(1)
        assert Path(ROOT / weights) == pretrain.pretrained_path(base)
        assert re.search(r"base_lr: 0.001\b", solver)


def test_pretrained_weights_load_into_the_finetune_net_except_the_classifier(tmp_path):
    import torch

    from caffe_compat.engine import analysis, weights
    torch.manual_seed(0)
    pre = analysis.load_net(os.fspath(ROOT / "models/alexnet_64/deploy.prototxt"))
    path = tmp_path / "pre.caffemodel"
    weights.save(pre, os.fspath(path))
    tuned = analysis.load_net(os.fspath(ROOT / "models/alexnet_64_finetune/deploy.prototxt"))
    fresh = tuned.layers[tuned.layer_index("fc8_fashion50")].blobs[0].detach().clone()
    weights.copy_from(tuned, os.fspath(path))
    for name, layer in pre.named_layers():
        if name == "fc8":
            continue
        for a, b in zip(layer.blobs, tuned.layers[tuned.layer_index(name)].blobs):
            assert torch.equal(a, b), name
    assert torch.equal(tuned.layers[tuned.layer_index("fc8_fashion50")].blobs[0], fresh)


TINY_NET = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 64 mirror: true scale: 0.0078125 mean_file: "unused" }
  data_param { source: "unused" backend: LMDB batch_size: 8 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 64 scale: 0.0078125 mean_file: "unused" }
  data_param { source: "unused" backend: LMDB batch_size: 8 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 4 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc8" type: "InnerProduct" bottom: "conv1" top: "fc8"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc8" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


def test_pretraining_runs_in_the_precision_asked_and_leaves_float32_weights(tmp_path):
    """--precision bf16: the passes run under bf16 autocast, the solver keeps float32 weights
    (the caffemodel a fine-tuning run loads), and pretrain.json says which precision ran."""
    import json

    import torch

    from caffe_compat.engine import analysis, weights
    rng = np.random.default_rng(0)
    first = max(pretrain.fashion50_indices(FASHION50)) + 1     # 40 images after them
    images = rng.integers(0, 256, (first + 48, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, first + 48, dtype=np.uint8)
    idx = tmp_path / "idx"
    idx.mkdir()
    for split, rows in (("train", slice(0, first + 40)), ("t10k", slice(first + 40, None))):
        _write_idx(idx / f"{split}-images-idx3-ubyte", images[rows])
        _write_idx(idx / f"{split}-labels-idx1-ubyte", labels[rows])
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "train_val.prototxt").write_text(TINY_NET)
    (model / "solver_pretrain.prototxt").write_text(
        f'net: "{model / "train_val.prototxt"}"\ntest_iter: 1\ntest_interval: 2\n'
        'test_initialization: false\n'
        'base_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 3\nsnapshot: 3\n'
        'snapshot_prefix: "unused"\nrandom_seed: 1\n')
    path = pretrain.pretrain("tiny", idx, tmp_path / "db", tmp_path / "runs",
                             report=lambda _: None, precision="bf16", layout="nchw",
                             models=tmp_path / "models")
    record = json.loads((path.parent / "pretrain.json").read_text())
    assert (record["precision"], record["layout"]) == ("bf16", "nchw")
    # tested at 2 (the interval) and at 3, the end between intervals: the weights written
    assert [t["iter"] for t in record["tests"]] == [2, 3]
    assert 0 <= record["tests"][-1]["accuracy"] <= 1
    net = analysis.load_net(os.fspath(model / "train_val.prototxt"), channels=3)
    before = net.layers[net.layer_index("fc8")].blobs[0].detach().clone()
    weights.copy_from(net, os.fspath(path))
    trained = net.layers[net.layer_index("fc8")].blobs[0]
    assert trained.dtype == torch.float32 and not torch.equal(trained, before)
