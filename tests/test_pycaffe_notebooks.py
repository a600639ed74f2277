"""BVLC's notebook flows on small synthetic stand-ins: 01-learning-lenet (NetSpec LeNet
written to prototxt, trained by SGDSolver on an MNIST-like LMDB), net_surgery (fully
connected layers cast to convolutions, params transplanted, a classification map) and
pascal-multilabel-with-datalayer (a Python data layer feeding a multilabel net)."""
from pathlib import Path

import numpy as np
import pytest

import caffe
from caffe import layers as L, params as P
from caffe_compat.data.db import DBWriter


def _mnist_like_lmdb(path, n=64, seed=0):
    """10 classes of 12x12 digits: class k is a bright bar in row k (plus noise)."""
    rng = np.random.RandomState(seed)
    with DBWriter(path, "lmdb") as db:
        for i in range(n):
            label = i % 10
            img = rng.randint(0, 40, (1, 12, 12)).astype(np.uint8)
            img[0, label + 1, 2:10] = 255
            db.put(f"{i:08d}", caffe.io.array_to_datum(img, label).SerializeToString())


def lenet(lmdb, batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=8, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool1, num_output=32, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def test_learning_lenet_flow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _mnist_like_lmdb(tmp_path / "train_lmdb")
    _mnist_like_lmdb(tmp_path / "test_lmdb", n=20, seed=1)
    Path("train.prototxt").write_text(str(lenet("train_lmdb", 16)))
    Path("test.prototxt").write_text(str(lenet("test_lmdb", 10)))
    Path("solver.prototxt").write_text(
        'train_net: "train.prototxt" test_net: "test.prototxt" test_iter: 2 '
        'test_interval: 1000 base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005 '
        'lr_policy: "inv" gamma: 0.0001 power: 0.75 display: 0 max_iter: 100 '
        'snapshot: 0 snapshot_prefix: "lenet" random_seed: 3\n')
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver("solver.prototxt")
    assert [(k, v.data.shape) for k, v in solver.net.blobs.items()][:2] == [
        ("data", (16, 1, 12, 12)), ("label", (16,))]
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()] == [
        ("conv1", (8, 1, 3, 3)), ("fc1", (32, 200)), ("score", (10, 32))]
    first = float(solver.net.forward()["loss"])
    solver.test_nets[0].forward()
    labels = solver.test_nets[0].blobs["label"].data
    assert labels.shape == (10,) and set(labels.astype(int)) <= set(range(10))
    solver.step(60)
    assert solver.iter == 60
    solver.test_nets[0].share_with(solver.net)
    correct = 0
    for _ in range(2):
        out = solver.test_nets[0].forward()
        correct += (solver.test_nets[0].blobs["score"].data.argmax(1) ==
                    solver.test_nets[0].blobs["label"].data).sum()
        assert float(out["loss"]) < first
    assert correct >= 16                       # of 20: an easy synthetic task


SMALL = """name: "small"
input: "data" input_shape { dim: 1 dim: 1 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
"""
FULL_CONV = """name: "small_full_conv"
input: "data" input_shape { dim: 1 dim: 1 dim: 12 dim: 12 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "fc-conv" type: "Convolution" bottom: "conv" top: "fc-conv"
        convolution_param { num_output: 4 kernel_size: 6 } }
"""


def test_net_surgery_flow(tmp_path):
    (tmp_path / "small.prototxt").write_text(SMALL)
    (tmp_path / "full.prototxt").write_text(FULL_CONV)
    net = caffe.Net(str(tmp_path / "small.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "small.caffemodel"))
    full = caffe.Net(str(tmp_path / "full.prototxt"), str(tmp_path / "small.caffemodel"),
                     caffe.TEST)
    assert full.params["fc-conv"][0].data.shape == (4, 3, 6, 6)
    np.testing.assert_array_equal(full.params["conv"][0].data, net.params["conv"][0].data)
    full.params["fc-conv"][0].data.flat = net.params["fc"][0].data.flat      # transplant
    full.params["fc-conv"][1].data[...] = net.params["fc"][1].data
    image = np.random.RandomState(0).rand(12, 12).astype(np.float32)
    full.blobs["data"].data[...] = image
    score_map = full.forward()["fc-conv"]
    assert score_map.shape == (1, 4, 5, 5)                 # a classification map
    for y, x in [(0, 0), (2, 3), (4, 4)]:
        window = image[y:y + 8, x:x + 8]
        fc = net.forward(data=window[None, None])["fc"][0]
        np.testing.assert_allclose(score_map[0, :, y, x], fc, rtol=1e-4, atol=1e-5)


MULTILABEL = """name: "multilabel" force_backward: false
layer { name: "data" type: "Python" top: "data" top: "label"
        python_param { module: "pycaffe_layer_examples" layer: "MultilabelDataLayer"
                       param_str: "{'batch_size': 8, 'im_shape': [6, 6], 'classes': 4}" } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "score" type: "InnerProduct" bottom: "conv" top: "score"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def test_multilabel_python_data_layer_flow(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.chdir(tmp_path)
    Path("train.prototxt").write_text(MULTILABEL)
    Path("solver.prototxt").write_text(
        'train_net: "train.prototxt" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" '
        'display: 0 max_iter: 100 snapshot: 0 snapshot_prefix: "ml" random_seed: 1\n')
    solver = caffe.SGDSolver("solver.prototxt")
    out = solver.net.forward()
    labels = solver.net.blobs["label"].data
    assert labels.shape == (8, 4) and set(np.unique(labels)) <= {0.0, 1.0}
    data = solver.net.blobs["data"].data
    np.testing.assert_array_equal(data[:, 0, 0, :].max(1), labels[:, 0])    # class 0: row 0
    s = solver.net.blobs["score"].data.astype(np.float64)
    expected = np.sum(np.maximum(s, 0) - s * labels + np.log1p(np.exp(-np.abs(s)))) / 8
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    start = float(out["loss"])
    solver.step(40)
    net = solver.net
    net.forward()
    predicted = net.blobs["score"].data > 0
    accuracy = (predicted == (net.blobs["label"].data > 0.5)).mean()
    assert float(net.blobs["loss"].data) < start and accuracy >= 0.9
