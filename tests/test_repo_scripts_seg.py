"""Segmentation, pose and Caffe-example scripts of other repositories, in their style, run
unchanged through ``import caffe``: SegNet-Tutorial's compute_bn_statistics.py,
test_segmentation_camvid.py / webcam_demo.py and Bayesian SegNet's image loading;
Realtime_Multi-Person_Pose_Estimation's multi-scale demo; BVLC's pyloss.py, siamese example
and 01-learning-lenet; DIGITS' Python-layer examples. Checked against float64 references."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import caffe
from segnet_bn_statistics import make_test_files, make_testable, segnet_images
from test_pycaffe_notebooks import _mnist_like_lmdb, lenet


def _f64(blob) -> torch.Tensor:
    return torch.from_numpy(np.asarray(blob.data, np.float64))       # a blob's data, float64


def _conv(x: np.ndarray, net, layer: str, **kw) -> torch.Tensor:
    """A convolution of ``net`` in float64 (x: N x C x H x W)."""
    p = net.params[layer]
    return F.conv2d(torch.from_numpy(np.asarray(x, np.float64)), _f64(p[0]), _f64(p[1]), **kw)


def _ip(x, net, layer: str) -> torch.Tensor:
    """An InnerProduct of ``net`` in float64."""
    x = torch.as_tensor(np.asarray(x, np.float64)).reshape(len(x), -1)
    return x @ _f64(net.params[layer][0]).T + _f64(net.params[layer][1])


# -- alexgkendall/SegNet-Tutorial: Scripts/compute_bn_statistics.py -----------------------
SEGNET_TRAIN = """name: "segnet_tiny"
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "train.txt" batch_size: 2 } include { phase: TRAIN } }
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "train.txt" batch_size: 1 } include { phase: TEST } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "conv1_bn" type: "BN" bottom: "conv1" top: "conv1" bn_param {
  scale_filler { type: "constant" value: 1.5 } shift_filler { type: "constant" value: 0.001 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv_classifier" type: "Convolution" bottom: "conv1" top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv_classifier" bottom: "label"
  top: "loss" loss_param { weight_by_label_freqs: true class_weighting: [1, 2, 1] } }
layer { name: "accuracy" type: "Accuracy" bottom: "conv_classifier" bottom: "label"
  top: "accuracy" top: "per_class_accuracy" }
"""


def test_segnet_compute_bn_statistics_then_the_inference_net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = segnet_images(tmp_path, 4)
    open("train.prototxt", "w").write(SEGNET_TRAIN)
    train = caffe.Net("train.prototxt", caffe.TRAIN)
    train.save("train.caffemodel")
    testable_msg = make_testable("train.prototxt")
    open("bn.prototxt", "w").write(text_format.MessageToString(testable_msg))
    assert [l.name for l in testable_msg.layer][:2] == ["data", "conv1"]
    train_size = len(open(testable_msg.layer[0].dense_image_data_param.source).readlines())
    minibatch_size = testable_msg.layer[0].dense_image_data_param.batch_size
    num_iterations = train_size // minibatch_size + train_size % minibatch_size
    test_net, test_msg = make_test_files("bn.prototxt", "train.caffemodel", num_iterations, 6, 8)
    test_net.save("test_weights.caffemodel")
    open("deploy.prototxt", "w").write(text_format.MessageToString(test_msg))

    # float64: conv1 per batch of 2, the batches' mean and (biased) variance averaged
    x = np.stack([cv2.imread(a).transpose(2, 0, 1) for a, _ in pairs]).astype(np.float64)
    c1 = [_conv(x[i:i + 2], train, "conv1", padding=1) for i in (0, 2)]
    mean = sum(c.mean(dim=(0, 2, 3)) for c in c1) / 2
    var = sum(c.var(dim=(0, 2, 3), unbiased=False) for c in c1) / 2 * (96 / 95)
    scale, shift = 1.5 / torch.sqrt(var + 1e-9), 0.001 - 1.5 * mean / torch.sqrt(var + 1e-9)
    np.testing.assert_allclose(test_net.params["conv1_bn"][0].data.ravel(), scale, rtol=1e-4)
    np.testing.assert_allclose(test_net.params["conv1_bn"][1].data.ravel(), shift, atol=1e-5)
    deploy = caffe.Net("deploy.prototxt", "test_weights.caffemodel", caffe.TEST)
    assert deploy.inputs == ["data"] and deploy.outputs == ["prob"]
    h = torch.relu(_conv(x[1:2], train, "conv1", padding=1) * scale[:, None, None]
                   + shift[:, None, None])
    want = torch.softmax(_conv(h, train, "conv_classifier"), 1)
    np.testing.assert_allclose(deploy.forward(data=x[1:2])["prob"], want, rtol=1e-4, atol=1e-6)


# -- SegNet-Tutorial: test_segmentation_camvid.py, webcam_demo.py, test_bayesian_segnet.py --
SEGNET_TEST = """name: "segnet_eval"
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "train.txt" batch_size: 1 } }
layer { name: "conv_classifier" type: "Convolution" bottom: "data" top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "conv_classifier" top: "prob" }
"""
WEBDEMO = """name: "segnet_webdemo"
input: "data" input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 8
layer { name: "conv_classifier" type: "Convolution" bottom: "data" top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "prob" type: "Softmax" bottom: "conv_classifier" top: "prob" }
layer { name: "argmax" type: "ArgMax" bottom: "prob" top: "argmax" argmax_param { axis: 1 } }
"""
BAYESIAN = """name: "bayesian_segnet_tiny"
input: "data" input_shape { dim: 6 dim: 3 dim: 4 dim: 5 }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop"
  dropout_param { dropout_ratio: 0.5 sample_weights_test: true } }
layer { name: "score" type: "Convolution" bottom: "drop" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


def test_segnet_camvid_webcam_and_bayesian_scripts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = segnet_images(tmp_path, 2, seed=3)
    open("test.prototxt", "w").write(SEGNET_TEST)
    net = caffe.Net("test.prototxt", caffe.TEST)
    net.save("segnet.caffemodel")
    for i in range(2):                                # test_segmentation_camvid.py
        net.forward()
        image, label = net.blobs["data"].data, net.blobs["label"].data
        ind = np.argmax(np.squeeze(net.blobs["prob"].data[0, :, :, :]), axis=0)
        image = np.transpose(np.squeeze(image[0]) / 255.0, (1, 2, 0))[:, :, (2, 1, 0)]
        bgr = cv2.imread(pairs[i][0]).astype(np.float64)
        np.testing.assert_allclose(image, bgr[:, :, ::-1] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(label[0, 0], cv2.imread(pairs[i][1], 0))
        want = _conv(bgr.transpose(2, 0, 1)[None], net, "conv_classifier", padding=1)[0]
        np.testing.assert_array_equal(ind, want.argmax(0).numpy())

    # webcam_demo.py: a BGR frame resized to the input, forward_all, the ArgMax blob, cv2.LUT
    cv2.imwrite("colours.png", np.array([[[0, 0, 0], [0, 0, 255], [0, 255, 0]]
                                          + [[255, 255, 255]] * 253], np.uint8))
    open("webdemo.prototxt", "w").write(WEBDEMO)
    demo = caffe.Net("webdemo.prototxt", "segnet.caffemodel", caffe.TEST)
    input_shape = demo.blobs["data"].data.shape
    label_colours = cv2.imread("colours.png").astype(np.uint8)
    frame = np.random.RandomState(5).randint(0, 256, (12, 16, 3)).astype(np.uint8)
    frame = cv2.resize(frame, (input_shape[3], input_shape[2]))
    input_image = np.asarray([frame.transpose((2, 0, 1))])
    demo.forward_all(data=input_image)
    segmentation_ind = np.squeeze(demo.blobs["argmax"].data)
    ind_3ch = np.resize(segmentation_ind, (3, input_shape[2], input_shape[3]))
    ind_3ch = ind_3ch.transpose(1, 2, 0).astype(np.uint8)
    segmentation_rgb = np.zeros(ind_3ch.shape, dtype=np.uint8)
    cv2.LUT(ind_3ch, label_colours, segmentation_rgb)
    want = _conv(input_image, net, "conv_classifier", padding=1)[0].argmax(0).numpy()
    np.testing.assert_array_equal(segmentation_ind, want)
    np.testing.assert_array_equal(segmentation_rgb, label_colours[0][want])

    # test_bayesian_segnet.py: caffe.io loading, RGB->BGR, one image repeated over the
    # batch; every Monte-Carlo sample is the net on its own dropout mask of the image
    open("bayesian.prototxt", "w").write(BAYESIAN)
    bayes = caffe.Net("bayesian.prototxt", caffe.TEST)
    input_shape = bayes.blobs["data"].data.shape
    input_image_raw = caffe.io.load_image(pairs[0][0])
    input_image = caffe.io.resize_image(input_image_raw, (input_shape[2], input_shape[3]))
    input_image = (input_image * 255).transpose((2, 0, 1))[(2, 1, 0), :, :]
    input_image = np.repeat(np.asarray([input_image]), input_shape[0], axis=0)
    bayes.forward_all(data=input_image)
    predicted = bayes.blobs["prob"].data
    np.testing.assert_allclose(input_image_raw, cv2.imread(pairs[0][0])[:, :, ::-1] / 255.0,
                               rtol=1e-6)
    drop, data = bayes.blobs["drop"].data, bayes.blobs["data"].data
    np.testing.assert_allclose(data, input_image, rtol=1e-6)
    kept = drop != 0
    np.testing.assert_allclose(drop[kept], 2 * data[kept], rtol=1e-6)   # 1 / (1 - ratio)
    assert 0.3 < kept.mean() < 0.7 and len({m.tobytes() for m in kept}) == input_shape[0]
    want = torch.softmax(_conv(drop, bayes, "score"), 1).numpy()
    np.testing.assert_allclose(predicted, want, rtol=1e-4, atol=1e-6)


# -- ZheC/Realtime_Multi-Person_Pose_Estimation: testing/python/demo.ipynb ---------------
POSE = """name: "pose_tiny"
input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layer { name: "pool1_stage1" type: "Pooling" bottom: "data" top: "pool1_stage1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv_stage1" type: "Convolution" bottom: "pool1_stage1" top: "conv_stage1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu_stage1" type: "ReLU" bottom: "conv_stage1" top: "conv_stage1" }
layer { name: "Mconv7_stage2_L2" type: "Convolution" bottom: "conv_stage1"
  top: "Mconv7_stage2_L2" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "Mconv7_stage2_L1" type: "Convolution" bottom: "conv_stage1"
  top: "Mconv7_stage2_L1" convolution_param { num_output: 4 kernel_size: 1 } }
"""


def padRightDownCorner(img, stride, padValue):
    pad = [0, 0, -img.shape[0] % stride, -img.shape[1] % stride]     # up, left, down, right
    return np.pad(img, ((0, pad[2]), (0, pad[3]), (0, 0)), constant_values=padValue), pad


def _pose_ref(net, x):
    """(PAFs, heatmaps) of the tiny pose net, float64."""
    c = torch.relu(_conv(F.max_pool2d(torch.from_numpy(x), 2).numpy(), net, "conv_stage1",
                         padding=1))
    return [F.conv2d(c, _f64(net.params[n][0]), _f64(net.params[n][1]))[0].numpy()
            for n in ("Mconv7_stage2_L1", "Mconv7_stage2_L2")]


def test_pose_demo_multiscale_heatmaps_and_pafs(tmp_path):
    (tmp_path / "pose.prototxt").write_text(POSE)
    net = caffe.Net(str(tmp_path / "pose.prototxt"), caffe.TEST)
    rng = np.random.RandomState(4)
    for b in (b for blobs in net.params.values() for b in blobs):
        b.data[...] = rng.randn(*b.data.shape) * 0.5
    model = {"boxsize": 12, "stride": 2, "padValue": 128}
    oriImg = rng.randint(0, 256, (10, 14, 3)).astype(np.uint8)
    multiplier = [x * model["boxsize"] / oriImg.shape[0] for x in (0.5, 1.0, 1.5)]
    heatmap_avg = np.zeros((oriImg.shape[0], oriImg.shape[1], 3))
    for scale in multiplier:
        imageToTest = cv2.resize(oriImg, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        padded, pad = padRightDownCorner(imageToTest, model["stride"], model["padValue"])
        net.blobs["data"].reshape(*(1, 3, padded.shape[0], padded.shape[1]))
        net.blobs["data"].data[...] = np.transpose(np.float32(padded[:, :, :, np.newaxis]),
                                                   (3, 2, 0, 1)) / 256 - 0.5
        output_blobs = net.forward()
        assert list(output_blobs) == ["Mconv7_stage2_L1", "Mconv7_stage2_L2"]   # Caffe's order
        heatmap = np.transpose(np.squeeze(net.blobs[list(output_blobs.keys())[1]].data),
                               (1, 2, 0))
        paf = np.squeeze(net.blobs[list(output_blobs.keys())[0]].data)
        x = np.transpose(padded[:, :, :, None].astype(np.float64), (3, 2, 0, 1)) / 256 - 0.5
        ref_paf, ref_heat = _pose_ref(net, x)
        np.testing.assert_allclose(heatmap, ref_heat.transpose(1, 2, 0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(paf, ref_paf, rtol=1e-4, atol=1e-5)
        heatmap = cv2.resize(heatmap, (0, 0), fx=model["stride"], fy=model["stride"],
                             interpolation=cv2.INTER_CUBIC)
        heatmap = heatmap[:padded.shape[0] - pad[2], :padded.shape[1] - pad[3], :]
        heatmap_avg += cv2.resize(heatmap, (oriImg.shape[1], oriImg.shape[0]),
                                  interpolation=cv2.INTER_CUBIC) / len(multiplier)
    assert np.isfinite(heatmap_avg).all() and np.abs(heatmap_avg).max() > 0
    # the same order when the forward names extra blobs or stops at a layer
    assert list(net.forward(blobs=["conv_stage1"])) == net.outputs + ["conv_stage1"]
    assert list(net.forward(end="Mconv7_stage2_L2")) == ["Mconv7_stage2_L2"]
    batch = net.blobs["data"].data.copy()
    assert list(net.forward_all(blobs=["pool1_stage1"], data=batch)) == net.outputs + [
        "pool1_stage1"]


# -- BVLC/caffe examples/pycaffe: pyloss.py in linreg.prototxt ---------------------------
LINREG = """name: 'LinearRegressionExample'
layer { type: 'DummyData' name: 'x' top: 'x'
  dummy_data_param { shape: { dim: 10 dim: 3 dim: 2 } data_filler: { type: 'gaussian' } } }
layer { type: 'DummyData' name: 'y' top: 'y'
  dummy_data_param { shape: { dim: 10 dim: 3 dim: 2 } data_filler: { type: 'gaussian' } } }
layer { type: 'InnerProduct' name: 'ipx' top: 'ipx' bottom: 'x'
  inner_product_param { num_output: 10 weight_filler { type: 'xavier' } } }
layer { type: 'InnerProduct' name: 'ipy' top: 'ipy' bottom: 'y'
  inner_product_param { num_output: 10 weight_filler { type: 'xavier' } } }
layer { type: '%s' name: 'loss' top: 'loss' bottom: 'ipx' bottom: 'ipy' %s loss_weight: %s }
"""


def test_pyloss_euclidean_layer_equals_the_builtin_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    python = "python_param { module: 'pycaffe_layer_examples' layer: 'EuclideanLossLayer' }"
    nets = []
    for name, kind, extra in (("py", "Python", python), ("builtin", "EuclideanLoss", "")):
        (tmp_path / f"{name}.prototxt").write_text(LINREG % (kind, extra, 2))
        nets.append(caffe.Net(str(tmp_path / f"{name}.prototxt"), caffe.TRAIN))
    py, builtin = nets
    py.save(str(tmp_path / "linreg.caffemodel"))
    builtin.copy_from(str(tmp_path / "linreg.caffemodel"))
    py.forward()
    x, y = py.blobs["x"].data.copy(), py.blobs["y"].data.copy()
    builtin.blobs["x"].data[...], builtin.blobs["y"].data[...] = x, y
    builtin.forward(start="ipx")          # the same DummyData values, not fresh ones
    for net in nets:
        net.backward()
    a, b = _ip(x, py, "ipx").numpy(), _ip(y, py, "ipy").numpy()
    assert py.blobs["loss"].data.shape == (1,) and py.blob_loss_weights["loss"] == 2
    np.testing.assert_allclose(py.blobs["loss"].data, np.sum((a - b) ** 2) / 20, rtol=1e-5)
    np.testing.assert_allclose(py.blobs["loss"].data, builtin.blobs["loss"].data, rtol=1e-5)
    # the top's diff holds the loss_weight; the builtin layer scales by it, while pyloss's
    # backward never reads top[0].diff, so its gradients are unweighted, as in Caffe
    assert py.blobs["loss"].diff[0] == builtin.blobs["loss"].diff == 2   # LossLayer: 0 axes
    np.testing.assert_allclose(py.blobs["ipx"].diff, (a - b) / 10, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(builtin.blobs["ipy"].diff, 2 * (b - a) / 10, rtol=1e-4, atol=1e-7)
    for layer in ("ipx", "ipy"):
        for mine, other in zip(py.params[layer], builtin.params[layer]):
            np.testing.assert_allclose(2 * mine.diff, other.diff, rtol=1e-4, atol=1e-6)


# -- BVLC/caffe examples/siamese: shared weights by param name, ContrastiveLoss -------------
def _branch(sfx: str, bottom: str, top: str) -> str:
    fill = 'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 }'
    return (f'layer {{ name: "conv1{sfx}" type: "Convolution" bottom: "{bottom}" top: "conv1{sfx}"'
            f' param {{ name: "conv1_w" lr_mult: 1 }} param {{ name: "conv1_b" lr_mult: 2 }}'
            f' convolution_param {{ num_output: 2 kernel_size: 3 {fill} }} }}\n'
            f'layer {{ name: "ip1{sfx}" type: "InnerProduct" bottom: "conv1{sfx}" top: "{top}"'
            f' param {{ name: "ip1_w" lr_mult: 1 }} param {{ name: "ip1_b" lr_mult: 2 }}'
            f' inner_product_param {{ num_output: 3 {fill} }} }}\n')


SIAMESE = ('name: "mnist_siamese_train_test"\n'
           'layer { name: "pair_data" type: "Input" top: "pair_data" top: "sim"\n'
           '  input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 } } }\n'
           'layer { name: "slice_pair" type: "Slice" bottom: "pair_data" top: "data" '
           'top: "data_p" slice_param { slice_dim: 1 slice_point: 1 } }\n'
           + _branch("", "data", "feat") + _branch("_p", "data_p", "feat_p") +
           'layer { name: "loss" type: "ContrastiveLoss" bottom: "feat" bottom: "feat_p" '
           'bottom: "sim" top: "loss" contrastive_loss_param { margin: 1 } }\n')
SIAMESE_DEPLOY = ('name: "mnist_siamese"\ninput: "data"\ninput_dim: 3 input_dim: 1 '
                  'input_dim: 6 input_dim: 6\n' + _branch("", "data", "feat"))


def _siamese_ref(w, pair, sim):
    """The contrastive loss of both branches with one set of weights (float64, autograd)."""
    def feat(x):
        return F.conv2d(x, w[0], w[1]).reshape(len(x), -1) @ w[2].T + w[3]
    sq = ((feat(pair[:, :1]) - feat(pair[:, 1:])) ** 2).sum(1)
    # the distance's value, with Caffe's gradient (a - b) / (d + 1e-4) for dissimilar pairs
    d = sq.detach().sqrt() + (sq - sq.detach()) / (2 * (sq.detach().sqrt() + 1e-4))
    per = torch.where(sim > 0, sq, torch.clamp(1 - d, min=0) ** 2)
    return per.sum() / (2 * len(pair))


def test_siamese_shared_weights_contrastive_loss_and_the_deploy_net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open("train.prototxt", "w").write(SIAMESE)
    open("solver.prototxt", "w").write('net: "train.prototxt" base_lr: 0.01 lr_policy: "fixed" '
                                       'momentum: 0 weight_decay: 0 max_iter: 10 display: 0 '
                                       'snapshot_prefix: "siamese"\n')
    solver = caffe.SGDSolver("solver.prototxt")
    net, rng = solver.net, np.random.RandomState(6)
    pair, sim = rng.rand(4, 2, 6, 6).astype(np.float32), np.array([1, 0, 1, 0], np.float32)
    pair[1, 1] = pair[1, 0] + 0.01                        # a dissimilar pair inside the margin
    net.blobs["pair_data"].data[...], net.blobs["sim"].data[...] = pair, sim
    assert list(net.params) == ["conv1", "ip1", "conv1_p", "ip1_p"]
    net.params["conv1"][0].data[0, 0, 0, 0] = 0.25        # shared: one blob for both layers
    assert net.params["conv1_p"][0].data[0, 0, 0, 0] == 0.25
    weights = [torch.tensor(net.params[n][i].data, dtype=torch.float64, requires_grad=True)
               for n in ("conv1", "ip1") for i in (0, 1)]
    loss = _siamese_ref(weights, torch.from_numpy(pair.astype(np.float64)),
                        torch.from_numpy(sim.astype(np.float64)))
    loss.backward()
    net.forward()
    np.testing.assert_allclose(net.blobs["loss"].data, loss.item(), rtol=1e-5)
    net.clear_param_diffs()
    net.backward()
    for k, (n, i) in enumerate((("conv1", 0), ("conv1", 1), ("ip1", 0), ("ip1", 1))):
        for layer in (n, n + "_p"):        # the diff is shared too: both branches summed
            np.testing.assert_allclose(net.params[layer][i].diff, weights[k].grad, rtol=1e-4,
                                       atol=1e-6)
    before = net.params["ip1"][1].data.copy()
    solver.step(1)                                       # lr_mult 2 on the bias
    np.testing.assert_allclose(net.params["ip1_p"][1].data,
                               before - 0.02 * weights[3].grad.numpy(), rtol=1e-4, atol=1e-7)
    net.save("siamese.caffemodel")
    open("deploy.prototxt", "w").write(SIAMESE_DEPLOY)      # mnist_siamese.ipynb's features
    deploy = caffe.Net("deploy.prototxt", "siamese.caffemodel", caffe.TEST)
    images = rng.rand(5, 1, 6, 6).astype(np.float32)
    np.testing.assert_allclose(deploy.forward_all(data=images)["feat"],
                               _ip(_conv(images, deploy, "conv1"), deploy, "ip1"), rtol=1e-4,
                               atol=1e-6)


# -- BVLC/caffe examples/01-learning-lenet.ipynb: the solver loop's calls ----------------
def test_learning_lenet_steps_partial_test_forward_and_update_diffs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _mnist_like_lmdb("train_lmdb", n=16)
    _mnist_like_lmdb("test_lmdb", n=9, seed=1)
    open("train.prototxt", "w").write(str(lenet("train_lmdb", 4)))
    open("test.prototxt", "w").write(str(lenet("test_lmdb", 3)))
    open("solver.prototxt", "w").write(
        'train_net: "train.prototxt" test_net: "test.prototxt" test_iter: 1 test_interval: 50 '
        'base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001 '
        'power: 0.75 display: 0 max_iter: 100 snapshot_prefix: "lenet" random_seed: 2\n')
    solver = caffe.SGDSolver("solver.prototxt")
    solver.net.forward()
    solver.test_nets[0].forward()
    for it in range(2):
        before = solver.net.params["conv1"][0].data.copy()
        solver.step(1)
        after = solver.net.params["conv1"][0].data
        # Caffe's update leaves the step it took in the diff: data -= diff
        np.testing.assert_allclose(solver.net.params["conv1"][0].diff, before - after,
                                   rtol=1e-4, atol=1e-7)     # float32 data
        assert np.abs(before - after).max() > 0 and solver.iter == it + 1
        test = solver.test_nets[0]
        data = test.blobs["data"].data.copy()
        test.forward(start="conv1")                    # the same batch, the new weights
        np.testing.assert_array_equal(test.blobs["data"].data, data)
        np.testing.assert_array_equal(test.params["conv1"][0].data, after)   # shared at test
        h = torch.relu(_ip(F.max_pool2d(_conv(data, test, "conv1"), 2, 2), test, "fc1"))
        np.testing.assert_allclose(test.blobs["score"].data, _ip(h, test, "score"), rtol=1e-4,
                                   atol=1e-6)
    test.forward()
    assert not np.array_equal(test.blobs["data"].data, data)      # a full forward refills


# -- NVIDIA/DIGITS: examples/python-layer and medical-imaging's Dice layer ----------------
DIGITS_NET = """name: "digits_segmentation"
layer { name: "data" type: "Input" top: "data" top: "label" exclude { stage: "deploy" }
  input_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
layer { name: "data" type: "Input" top: "data" include { stage: "deploy" }
  input_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
layer { name: "scale" type: "Power" bottom: "data" top: "scale" power_param { scale: 0.0125 } }
layer { name: "blank_square" type: "Python" bottom: "scale" top: "scale" include { phase: TRAIN }
  python_param { module: "pycaffe_layer_examples" layer: "BlankSquareLayer"
                 param_str: "{'fraction': 2}" } }
layer { name: "score" type: "Convolution" bottom: "scale" top: "score"
  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "dice" type: "Python" bottom: "score" bottom: "label" top: "dice"
  python_param { module: "pycaffe_layer_examples" layer: "Dice" } exclude { stage: "deploy" } }
"""


def test_digits_python_layers_by_phase_and_stage(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.chdir(tmp_path)
    open(proto := "net.prototxt", "w").write(DIGITS_NET)
    rng = np.random.RandomState(9)
    image = rng.randint(1, 256, (2, 1, 8, 8)).astype(np.float32)
    label = (rng.rand(2, 1, 8, 8) > 0.5).astype(np.float32)
    train, test = caffe.Net(proto, caffe.TRAIN), caffe.Net(proto, caffe.TEST)
    assert "blank_square" in train._layer_names and "blank_square" not in test._layer_names
    for net in (train, test):
        out = net.forward(data=image, label=label)
        assert net.blob_loss_weights["dice"] == 0 and out["dice"].shape == (1,)
        prediction = np.argmax(net.blobs["score"].data, axis=1)
        a_pl = (prediction * label[:, 0]).sum((1, 2))
        want = np.mean(2 * a_pl / (prediction.sum((1, 2)) + label[:, 0].sum((1, 2))))
        np.testing.assert_allclose(out["dice"], [want], rtol=1e-6)
    scale = train.blobs["scale"].data
    blanked = scale == 0
    assert blanked.sum((1, 2, 3)).tolist() == [16, 16]           # a 4x4 quarter of each
    np.testing.assert_allclose(scale[~blanked], image[~blanked] * 0.0125, rtol=1e-6)
    np.testing.assert_allclose(test.blobs["scale"].data, image * 0.0125, rtol=1e-6)
    deploy = caffe.Net(proto, caffe.TEST, stages=["deploy"])
    assert deploy.inputs == ["data"] and "dice" not in deploy.blobs and deploy.outputs == ["score"]
    # a fork's module inside its own pycaffe package (DetectNet's caffe.layers.detectnet is
    # answered by caffe_compat.detectnet: tests/test_detectnet_clustering.py)
    open("fork.prototxt", "w").write(DIGITS_NET.replace(
        'pycaffe_layer_examples" layer: "Dice', 'caffe.layers.fork_only.module" layer: "X'))
    with pytest.raises(Exception, match="another Caffe's own python/caffe package"):
        caffe.Net("fork.prototxt", caffe.TEST)
