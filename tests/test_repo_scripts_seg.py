"""Segmentation, pose and Caffe-example scripts of other repositories, in their style, run
unchanged through ``import caffe``: SegNet-Tutorial's compute_bn_statistics.py,
test_segmentation_camvid.py / webcam_demo.py and Bayesian SegNet's image loading;
Realtime_Multi-Person_Pose_Estimation's multi-scale demo; BVLC's pyloss.py, siamese example
and 01-learning-lenet; DIGITS' Python-layer examples. Checked against float64 references."""
from __future__ import annotations

import textwrap

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import caffe
from caffe.proto import caffe_pb2


def _f64(blob) -> torch.Tensor:
    return torch.from_numpy(np.asarray(blob.data, np.float64))


def _conv(x: np.ndarray, net, layer: str, **kw) -> torch.Tensor:
    """A convolution of ``net`` in float64 (x: N x C x H x W)."""
    p = net.params[layer]
    return F.conv2d(torch.from_numpy(np.asarray(x, np.float64)), _f64(p[0]), _f64(p[1]), **kw)


# -- alexgkendall/SegNet-Tutorial: Scripts/compute_bn_statistics.py -----------------------
SEGNET_TRAIN = """name: "segnet_tiny"
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "train.txt" batch_size: 2 shuffle: false }
  include { phase: TRAIN } }
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "test.txt" batch_size: 1 } include { phase: TEST } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "conv1_bn" type: "BN" bottom: "conv1" top: "conv1"
  bn_param { scale_filler { type: "constant" value: 1 }
             shift_filler { type: "constant" value: 0.001 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv_classifier" type: "Convolution" bottom: "conv1" top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv_classifier" bottom: "label"
  top: "loss" loss_param { weight_by_label_freqs: true class_weighting: 1 class_weighting: 2
  class_weighting: 1 } }
layer { name: "accuracy" type: "Accuracy" bottom: "conv_classifier" bottom: "label"
  top: "accuracy" top: "per_class_accuracy" }
"""


def _segnet_images(folder, n: int, size=(6, 8), seed=0) -> list[tuple[str, str]]:
    """``n`` BGR images and label images (classes 0-2) written as PNGs."""
    rng, pairs = np.random.RandomState(seed), []
    for i in range(n):
        img, lab = folder / f"im{i}.png", folder / f"lab{i}.png"
        cv2.imwrite(str(img), rng.randint(0, 256, size + (3,)).astype(np.uint8))
        cv2.imwrite(str(lab), rng.randint(0, 3, size).astype(np.uint8))
        pairs.append((str(img), str(lab)))
    return pairs


def make_testable(train_model_path):
    train_net = caffe_pb2.NetParameter()
    text_format.Merge(open(train_model_path).read(), train_net)
    for layer in train_net.layer:
        if layer.type == "BN" and len(layer.top) == 1:
            layer.top.append(layer.top[0] + "-mean")
            layer.top.append(layer.top[0] + "-var")
    if train_net.layer[1].name == "data" and train_net.layer[1].include:
        train_net.layer.remove(train_net.layer[1])
        if train_net.layer[0].include:
            train_net.layer[0].include.remove(train_net.layer[0].include[0])
    return train_net


def make_test_files(testable_net_path, train_weights_path, num_iterations, in_h, in_w):
    testable_msg = caffe_pb2.NetParameter()
    text_format.Merge(open(testable_net_path).read(), testable_msg)
    bn_layers = [l.name for l in testable_msg.layer if l.type == "BN"]
    bn_blobs = [l.top[0] for l in testable_msg.layer if l.type == "BN"]
    bn_means = [l.top[1] for l in testable_msg.layer if l.type == "BN"]
    bn_vars = [l.top[2] for l in testable_msg.layer if l.type == "BN"]
    net = caffe.Net(testable_net_path, train_weights_path, caffe.TEST)
    res = net.forward()
    bn_avg_mean = {m: np.squeeze(res[m]).copy() for m in bn_means}
    bn_avg_var = {v: np.squeeze(res[v]).copy() for v in bn_vars}
    for _ in range(1, num_iterations):
        res = net.forward()
        for m in bn_means:
            bn_avg_mean[m] += np.squeeze(res[m])
        for v in bn_vars:
            bn_avg_var[v] += np.squeeze(res[v])
    for m in bn_means:
        bn_avg_mean[m] /= num_iterations
    for v in bn_vars:
        bn_avg_var[v] /= num_iterations
    for bn_blob, bn_var in zip(bn_blobs, bn_vars):
        m = np.prod(net.blobs[bn_blob].data.shape) / np.prod(bn_avg_var[bn_var].shape)
        bn_avg_var[bn_var] *= (m / (m - 1))
    for bn_layer, bn_mean, bn_var in zip(bn_layers, bn_means, bn_vars):
        gamma = np.squeeze(net.params[bn_layer][0].data)
        beta = np.squeeze(net.params[bn_layer][1].data)
        new_gamma = gamma / np.sqrt(bn_avg_var[bn_var] + 1e-9)
        new_beta = beta - gamma * bn_avg_mean[bn_mean] / np.sqrt(bn_avg_var[bn_var] + 1e-9)
        net.params[bn_layer][0].data[...] = new_gamma.reshape(net.params[bn_layer][0].data.shape)
        net.params[bn_layer][1].data[...] = new_beta.reshape(net.params[bn_layer][1].data.shape)
    test_msg = testable_msg
    for data_layer in [l for l in test_msg.layer if l.type.endswith("Data")]:
        test_msg.layer.remove(data_layer)
    test_msg.input.append("data")
    test_msg.input_dim.extend([1, 3, in_h, in_w])
    for l in test_msg.layer:
        if l.type == "BN":
            for dead in l.top[1:]:
                l.top.remove(dead)
            l.bn_param.bn_mode = caffe_pb2.BNParameter.INFERENCE
    dead_outputs = [l for l in test_msg.layer if l.type in ["SoftmaxWithLoss", "Accuracy"]]
    out_bottom = dead_outputs[0].bottom[0]
    for dead in dead_outputs:
        test_msg.layer.remove(dead)
    test_msg.layer.add(name="prob", type="Softmax", bottom=[out_bottom], top=["prob"])
    return net, test_msg


def _segnet_ref(net, x, gamma, beta, mean=None, var=None):
    """conv1 -> BN (batch statistics, or the given ones) -> ReLU -> classifier, float64."""
    c1 = _conv(x, net, "conv1", padding=1)
    if mean is None:
        mean, var = c1.mean(dim=(0, 2, 3)), c1.var(dim=(0, 2, 3), unbiased=False)
    norm = (c1 - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-9)
    bn = torch.relu(norm * gamma[:, None, None] + beta[:, None, None])
    return F.conv2d(bn, _f64(net.params["conv_classifier"][0]),
                    _f64(net.params["conv_classifier"][1])), c1


def test_segnet_compute_bn_statistics_then_the_inference_net(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = _segnet_images(tmp_path, 4)
    (tmp_path / "train.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
    (tmp_path / "test.txt").write_text(f"{pairs[0][0]} {pairs[0][1]}\n")
    (tmp_path / "train.prototxt").write_text(SEGNET_TRAIN)
    train = caffe.Net("train.prototxt", caffe.TRAIN)
    train.params["conv1_bn"][0].data[...] = np.array([1.5, 0.5, 2.0]).reshape(1, 3, 1, 1)
    train.save("train.caffemodel")

    testable_msg = make_testable("train.prototxt")
    with open("bn_calc.prototxt", "w") as f:
        f.write(text_format.MessageToString(testable_msg))
    assert [l.name for l in testable_msg.layer][:2] == ["data", "conv1"]
    train_ims = [line.split()[0] for line in open(testable_msg.layer[0]
                                                  .dense_image_data_param.source)]
    minibatch_size = testable_msg.layer[0].dense_image_data_param.batch_size
    num_iterations = len(train_ims) // minibatch_size + len(train_ims) % minibatch_size
    test_net, test_msg = make_test_files("bn_calc.prototxt", "train.caffemodel",
                                         num_iterations, 6, 8)
    test_net.save("test_weights.caffemodel")
    with open("deploy.prototxt", "w") as f:
        f.write(text_format.MessageToString(test_msg))

    # the same statistics from numpy: per batch, as the BN tops give them, then averaged
    x = np.stack([cv2.imread(a).transpose(2, 0, 1) for a, _ in pairs]).astype(np.float64)
    gamma, beta = torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64), torch.full((3,), 0.001,
                                                                                  dtype=torch.float64)
    c1 = [_segnet_ref(train, x[i:i + 2], gamma, beta)[1] for i in (0, 2)]
    mean = sum(c.mean(dim=(0, 2, 3)) for c in c1) / 2
    var = sum(c.var(dim=(0, 2, 3), unbiased=False) for c in c1) / 2 * (96 / 95)
    np.testing.assert_allclose(test_net.params["conv1_bn"][0].data.ravel(),
                               gamma / torch.sqrt(var + 1e-9), rtol=1e-4)
    np.testing.assert_allclose(test_net.params["conv1_bn"][1].data.ravel(),
                               beta - gamma * mean / torch.sqrt(var + 1e-9), rtol=1e-4, atol=1e-5)

    deploy = caffe.Net("deploy.prototxt", "test_weights.caffemodel", caffe.TEST)
    assert deploy.inputs == ["data"] and deploy.outputs == ["prob"]
    prob = deploy.forward(data=x[1:2])["prob"]
    logits = _segnet_ref(train, x[1:2], gamma, beta, mean, var)[0]
    np.testing.assert_allclose(prob, torch.softmax(logits, 1), rtol=1e-4, atol=1e-6)


# -- SegNet-Tutorial: test_segmentation_camvid.py, webcam_demo.py, test_bayesian_segnet.py --
SEGNET_TEST = """name: "segnet_eval"
layer { name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param { source: "test.txt" batch_size: 1 } }
layer { name: "conv_classifier" type: "Convolution" bottom: "data" top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.01 }
  bias_filler { type: "constant" value: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "conv_classifier" top: "prob" }
"""
WEBDEMO = """name: "segnet_webdemo"
input: "data" input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 8
layer { name: "conv_classifier" type: "Convolution" bottom: "data" top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "prob" type: "Softmax" bottom: "conv_classifier" top: "prob" }
layer { name: "argmax" type: "ArgMax" bottom: "prob" top: "argmax" argmax_param { axis: 1 } }
"""


def test_segnet_camvid_and_webcam_colouring(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = _segnet_images(tmp_path, 2, seed=3)
    open("test.txt", "w").write("".join(f"{a} {b}\n" for a, b in pairs))
    open("test.prototxt", "w").write(SEGNET_TEST)
    net = caffe.Net("test.prototxt", caffe.TEST)
    net.save("segnet.caffemodel")
    label_colours = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128]])
    for i in range(2):
        net.forward()
        image, label = net.blobs["data"].data, net.blobs["label"].data
        output = np.squeeze(net.blobs["prob"].data[0, :, :, :])
        ind = np.argmax(output, axis=0)
        r, r_gt = ind.copy(), label.copy()
        for l in range(0, 3):
            r[ind == l] = label_colours[l, 0]
            r_gt[label == l] = label_colours[l, 0]
        image = np.transpose(np.squeeze(image[0]) / 255.0, (1, 2, 0))[:, :, (2, 1, 0)]
        bgr = cv2.imread(pairs[i][0]).astype(np.float64)
        np.testing.assert_allclose(image, bgr[:, :, ::-1] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(label[0, 0], cv2.imread(pairs[i][1], 0))
        want = _conv(bgr.transpose(2, 0, 1)[None], net, "conv_classifier", padding=1)[0]
        np.testing.assert_array_equal(ind, want.argmax(0).numpy())
        np.testing.assert_array_equal(r_gt[0, 0], label_colours[:, 0][label[0, 0].astype(int)])

    # webcam_demo.py: a BGR frame resized to the input, forward_all, the ArgMax blob, cv2.LUT
    cv2.imwrite("colours.png", np.array([[[0, 0, 0], [0, 0, 255], [0, 255, 0]]
                                          + [[255, 255, 255]] * 253], np.uint8))
    open("webdemo.prototxt", "w").write(WEBDEMO)
    demo = caffe.Net("webdemo.prototxt", "segnet.caffemodel", caffe.TEST)
    input_shape = demo.blobs["data"].data.shape
    assert demo.blobs["argmax"].data.shape == (1, 1, 6, 8)
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


BAYESIAN = """name: "bayesian_segnet_tiny"
input: "data" input_shape { dim: 6 dim: 3 dim: 4 dim: 5 }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop"
  dropout_param { dropout_ratio: 0.5 sample_weights_test: true } }
layer { name: "score" type: "Convolution" bottom: "drop" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 0.02 } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""


def test_bayesian_segnet_image_loading_and_the_samples(tmp_path):
    """test_bayesian_segnet.py's input path (caffe.io.load_image/resize_image, RGB->BGR, one
    image repeated over the batch); every sample is the net on a dropout mask of it."""
    (tmp_path / "net.prototxt").write_text(BAYESIAN)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    rgb = np.random.RandomState(2).randint(0, 256, (8, 10, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), rgb[:, :, ::-1])
    input_shape = net.blobs["data"].data.shape
    input_image_raw = caffe.io.load_image(str(tmp_path / "im.png"))
    input_image = caffe.io.resize_image(input_image_raw, (input_shape[2], input_shape[3]))
    input_image = (input_image * 255).transpose((2, 0, 1))[(2, 1, 0), :, :]
    input_image = np.repeat(np.asarray([input_image]), input_shape[0], axis=0)
    net.forward_all(data=input_image)
    predicted = net.blobs["prob"].data
    output, uncertainty = np.mean(predicted, axis=0), np.var(predicted, axis=0)
    assert output.shape == uncertainty.shape == (3, 4, 5) and uncertainty.max() > 0

    np.testing.assert_allclose(input_image_raw, rgb / 255.0, rtol=1e-6)      # RGB in [0, 1]
    np.testing.assert_allclose(net.blobs["data"].data, input_image, rtol=1e-6)
    drop, data = net.blobs["drop"].data, net.blobs["data"].data
    kept = drop != 0
    np.testing.assert_allclose(drop[kept], 2 * data[kept], rtol=1e-6)   # 1 / (1 - ratio)
    assert 0.3 < kept.mean() < 0.7 and len({m.tobytes() for m in kept}) == input_shape[0]
    want = torch.softmax(_conv(drop, net, "score"), 1).numpy()
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
    h, w = img.shape[:2]
    pad = [0, 0, 0 if h % stride == 0 else stride - h % stride,
           0 if w % stride == 0 else stride - w % stride]        # up, left, down, right
    img = np.concatenate([img, np.tile(img[-1:] * 0 + padValue, (pad[2], 1, 1))], 0)
    img = np.concatenate([img, np.tile(img[:, -1:] * 0 + padValue, (1, pad[3], 1))], 1)
    return img, pad


def _pose_ref(net, x):
    """(PAFs, heatmaps) of the tiny pose net, float64."""
    c = torch.relu(_conv(F.max_pool2d(torch.from_numpy(x), 2).numpy(), net, "conv_stage1",
                         padding=1))
    return [F.conv2d(c, _f64(net.params[n][0]), _f64(net.params[n][1]))[0].numpy()
            for n in ("Mconv7_stage2_L1", "Mconv7_stage2_L2")]


def _upsample(maps, stride, padded, pad, ori):
    """The demo's way back to the image: stride up, padding off, image size."""
    maps = cv2.resize(np.transpose(maps, (1, 2, 0)), (0, 0), fx=stride, fy=stride,
                      interpolation=cv2.INTER_CUBIC)
    maps = maps[:padded.shape[0] - pad[2], :padded.shape[1] - pad[3], :]
    return cv2.resize(maps, (ori.shape[1], ori.shape[0]), interpolation=cv2.INTER_CUBIC)


def test_pose_demo_multiscale_heatmaps_and_pafs(tmp_path):
    (tmp_path / "pose_deploy.prototxt").write_text(POSE)
    net = caffe.Net(str(tmp_path / "pose_deploy.prototxt"), caffe.TEST)
    rng = np.random.RandomState(4)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape) * 0.5
    model = {"boxsize": 12, "stride": 2, "padValue": 128}
    oriImg = rng.randint(0, 256, (10, 14, 3)).astype(np.uint8)
    multiplier = [x * model["boxsize"] / oriImg.shape[0] for x in (0.5, 1.0, 1.5)]
    heatmap_avg = np.zeros((oriImg.shape[0], oriImg.shape[1], 3))
    paf_avg = np.zeros((oriImg.shape[0], oriImg.shape[1], 4))
    want_heat, want_paf = heatmap_avg.copy(), paf_avg.copy()
    for scale in multiplier:
        imageToTest = cv2.resize(oriImg, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        padded, pad = padRightDownCorner(imageToTest, model["stride"], model["padValue"])
        net.blobs["data"].reshape(*(1, 3, padded.shape[0], padded.shape[1]))
        net.blobs["data"].data[...] = np.transpose(np.float32(padded[:, :, :, np.newaxis]),
                                                   (3, 2, 0, 1)) / 256 - 0.5
        output_blobs = net.forward()
        assert list(output_blobs) == ["Mconv7_stage2_L1", "Mconv7_stage2_L2"]   # Caffe's order
        heatmap = np.squeeze(net.blobs[list(output_blobs.keys())[1]].data)
        paf = np.squeeze(net.blobs[list(output_blobs.keys())[0]].data)
        assert heatmap.shape == (3, padded.shape[0] // 2, padded.shape[1] // 2)
        heatmap_avg += _upsample(heatmap, model["stride"], padded, pad, oriImg) / len(multiplier)
        paf_avg += _upsample(paf, model["stride"], padded, pad, oriImg) / len(multiplier)
        x = np.transpose(padded[:, :, :, None].astype(np.float64), (3, 2, 0, 1)) / 256 - 0.5
        ref_paf, ref_heat = _pose_ref(net, x)
        want_heat += _upsample(ref_heat, model["stride"], padded, pad, oriImg) / len(multiplier)
        want_paf += _upsample(ref_paf, model["stride"], padded, pad, oriImg) / len(multiplier)
    np.testing.assert_allclose(heatmap_avg, want_heat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(paf_avg, want_paf, rtol=1e-4, atol=1e-5)
    # the same order when the forward names extra blobs or stops at a layer
    assert list(net.forward(blobs=["conv_stage1"])) == net.outputs + ["conv_stage1"]
    assert list(net.forward(end="Mconv7_stage2_L2")) == ["Mconv7_stage2_L2"]
    batch = net.blobs["data"].data.copy()
    assert list(net.forward_all(blobs=["pool1_stage1"], data=batch)) == net.outputs + [
        "pool1_stage1"]


# -- BVLC/caffe examples/pycaffe: pyloss.py in linreg.prototxt ---------------------------
PYLOSS = '''
import numpy as np
import caffe


class EuclideanLossLayer(caffe.Layer):
    """Half the mean squared distance, written as pycaffe's example layer is."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num
'''
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
    (tmp_path / "pyloss.py").write_text(PYLOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    python = "python_param { module: 'pyloss' layer: 'EuclideanLossLayer' }"
    nets = []
    for name, kind, extra in (("py", "Python", python), ("builtin", "EuclideanLoss", "")):
        (tmp_path / f"{name}.prototxt").write_text(LINREG % (kind, extra, 2))
        nets.append(caffe.Net(str(tmp_path / f"{name}.prototxt"), caffe.TRAIN))
    py, builtin = nets
    for layer in py.params:
        for mine, other in zip(py.params[layer], builtin.params[layer]):
            other.data[...] = mine.data
    py.forward()
    x, y = py.blobs["x"].data.copy(), py.blobs["y"].data.copy()
    builtin.blobs["x"].data[...], builtin.blobs["y"].data[...] = x, y
    builtin.forward(start="ipx")          # the same DummyData values, not fresh ones
    for net in nets:
        net.backward()
    a = x.reshape(10, 6).astype(np.float64) @ _f64(py.params["ipx"][0]).numpy().T \
        + _f64(py.params["ipx"][1]).numpy()
    b = y.reshape(10, 6).astype(np.float64) @ _f64(py.params["ipy"][0]).numpy().T \
        + _f64(py.params["ipy"][1]).numpy()
    assert py.blobs["loss"].data.shape == (1,) and py.blob_loss_weights["loss"] == 2
    np.testing.assert_allclose(py.blobs["loss"].data, np.sum((a - b) ** 2) / 20, rtol=1e-5)
    np.testing.assert_allclose(py.blobs["loss"].data, builtin.blobs["loss"].data, rtol=1e-5)
    # the top's diff holds the loss_weight; the builtin layer scales by it, while pyloss's
    # backward never reads top[0].diff, so its gradients are unweighted, as in Caffe
    assert builtin.blobs["loss"].data.shape == ()                  # LossLayer: 0 axes
    assert py.blobs["loss"].diff[0] == builtin.blobs["loss"].diff == 2
    np.testing.assert_allclose(py.blobs["ipx"].diff, (a - b) / 10, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(builtin.blobs["ipy"].diff, 2 * (b - a) / 10, rtol=1e-4, atol=1e-7)
    for layer in ("ipx", "ipy"):
        for mine, other in zip(py.params[layer], builtin.params[layer]):
            np.testing.assert_allclose(2 * mine.diff, other.diff, rtol=1e-4, atol=1e-6)


# -- BVLC/caffe examples/siamese: shared weights by param name, ContrastiveLoss -------------
def _branch(suffix: str, bottom: str, top: str) -> str:
    return (f'layer {{ name: "conv1{suffix}" type: "Convolution" bottom: "{bottom}" '
            f'top: "conv1{suffix}" param {{ name: "conv1_w" lr_mult: 1 }} '
            f'param {{ name: "conv1_b" lr_mult: 2 }} convolution_param {{ num_output: 2 '
            f'kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}\n'
            f'layer {{ name: "ip1{suffix}" type: "InnerProduct" bottom: "conv1{suffix}" '
            f'top: "{top}" param {{ name: "ip1_w" lr_mult: 1 }} param {{ name: "ip1_b" '
            f'lr_mult: 2 }} inner_product_param {{ num_output: 3 weight_filler {{ type: '
            f'"xavier" }} bias_filler {{ type: "constant" value: 0.1 }} }} }}\n')


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


def _siamese_ref(params, pair, sim):
    """The contrastive loss of both branches with one set of weights (float64, autograd)."""
    def feat(x):
        c = F.conv2d(x, params[0], params[1])
        return c.reshape(len(x), -1) @ params[2].T + params[3]
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
    net = solver.net
    rng = np.random.RandomState(6)
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
        np.testing.assert_allclose(net.params[n][i].diff, weights[k].grad, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(net.params[n + "_p"][i].diff, weights[k].grad, rtol=1e-4,
                                   atol=1e-6)
    before = net.params["ip1"][1].data.copy()
    solver.step(1)                                       # lr_mult 2 on the bias
    np.testing.assert_allclose(net.params["ip1_p"][1].data,
                               before - 0.02 * weights[3].grad.numpy(), rtol=1e-4, atol=1e-7)
    net.save("siamese.caffemodel")

    # mnist_siamese.ipynb: the deploy net's features of a few images, batched by forward_all
    open("deploy.prototxt", "w").write(SIAMESE_DEPLOY)
    deploy = caffe.Net("deploy.prototxt", "siamese.caffemodel", caffe.TEST)
    images = rng.rand(5, 1, 6, 6).astype(np.float32)
    feat = deploy.forward_all(data=images)["feat"]
    c = _conv(images, deploy, "conv1").reshape(5, -1)
    want = c.numpy() @ _f64(deploy.params["ip1"][0]).numpy().T + _f64(deploy.params["ip1"][1]).numpy()
    assert feat.shape == (5, 3)
    np.testing.assert_allclose(feat, want, rtol=1e-4, atol=1e-6)
