"""Detection and segmentation scripts from other repositories, in their style, run unchanged
through ``import caffe`` and checked against float64 numpy: MTCNN's image pyramid
(DuinoDu/mtcnn ``demo.py``), HED's side outputs (s9xie/hed), FCN's data layer, surgery,
solving and scoring (shelhamer/fcn.berkeleyvision.org), py-faster-rcnn's ``im_detect``,
proposal and RoI data layers and snapshot (rbgirshick/py-faster-rcnn) and SSD's
``ssd_detect.py`` (weiliu89/caffe). (Our own scripts, written after reading theirs.)"""
from __future__ import division

import ast
import math

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

import caffe
from caffe.proto import caffe_pb2


# -- float64 references (Caffe's arithmetic, written from its source) ------------------
def conv(x, w, b=None, stride=1, pad=0):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    y = np.einsum("nchwij,ocij->nohw", win[:, :, ::stride, ::stride], w)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def max_pool(x, k, s):
    """Caffe's MAX pooling without pad: ceil output size, windows clipped to the map."""
    h, w = x.shape[2:]
    oh, ow = math.ceil((h - k) / s) + 1, math.ceil((w - k) / s) + 1
    x = np.pad(x, ((0, 0), (0, 0), (0, (oh - 1) * s + k - h), (0, (ow - 1) * s + k - w)),
               constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[
        :, :, ::s, ::s].max(axis=(4, 5))


def prelu(x, slope):
    return np.where(x > 0, x, x * slope.reshape((1, -1) + (1,) * (x.ndim - 2)))


def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def deconv(x, w, stride):
    """Caffe's Deconvolution (no pad, one group): weights (C_in, C_out, k, k)."""
    n, c, h, wd = x.shape
    k = w.shape[2]
    y = np.zeros((n, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            y[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
                "nc,cokl->nokl", x[:, :, i, j], w)
    return y


def p64(net, name, i=0):
    return net.params[name][i].data.astype(np.float64)


def params64(net):
    """Float64 copies of every parameter, read once (a numpy view handed out between
    forwards counts as an edit: the engine re-exports, and after two runs torch)."""
    copies = {(n, i): b.data.astype(np.float64) for n, v in net.params.items()
              for i, b in enumerate(v)}
    return lambda name, i=0: copies[name, i]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def layer(name, kind, bottoms, tops, body=""):
    bottoms = "".join(f' bottom: "{b}"' for b in bottoms.split())
    tops = "".join(f' top: "{t}"' for t in tops.split())
    return f'layer {{ name: "{name}" type: "{kind}"{bottoms}{tops} {body} }}\n'


def cv(n, k, extra=""):
    return (f"convolution_param {{ num_output: {n} kernel_size: {k} {extra} "
            'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } }')


def ip(n):
    return (f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.2 }} '
            'bias_filler { type: "gaussian" std: 0.1 } }')


# -- MTCNN: a P-Net image pyramid, then R-Net on batches of boxes ------------------------
PNET = ('name: "PNet"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 12\ninput_dim: 12\n'
        + layer("conv1", "Convolution", "data", "conv1", cv(4, 3))
        + layer("PReLU1", "PReLU", "conv1", "conv1")
        + layer("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
        + layer("conv2", "Convolution", "pool1", "conv2", cv(6, 3))
        + layer("PReLU2", "PReLU", "conv2", "conv2")
        + layer("conv4-1", "Convolution", "conv2", "conv4-1", cv(2, 1))
        + layer("conv4-2", "Convolution", "conv2", "conv4-2", cv(4, 1))
        + layer("prob1", "Softmax", "conv4-1", "prob1"))
RNET = ('name: "RNet"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 24\ninput_dim: 24\n'
        + layer("conv1", "Convolution", "data", "conv1", cv(4, 3))
        + layer("prelu1", "PReLU", "conv1", "conv1")
        + layer("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
        + layer("conv2", "Convolution", "pool1", "conv2", cv(6, 3))
        + layer("prelu2", "PReLU", "conv2", "conv2")
        + layer("conv4", "InnerProduct", "conv2", "conv4", ip(16))
        + layer("prelu4", "PReLU", "conv4", "conv4")
        + layer("conv5-1", "InnerProduct", "conv4", "conv5-1", ip(2))
        + layer("conv5-2", "InnerProduct", "conv4", "conv5-2", ip(4))
        + layer("prob1", "Softmax", "conv5-1", "prob1"))


def _slopes(net, names, rng):
    for name in names:
        net.params[name][0].data[...] = rng.uniform(-0.5, 0.5, net.params[name][0].data.shape)


def pnet_reference(p64, x):
    h = max_pool(prelu(conv(x, p64("conv1"), p64("conv1", 1)), p64("PReLU1")), 2, 2)
    h = prelu(conv(h, p64("conv2"), p64("conv2", 1)), p64("PReLU2"))
    return (softmax(conv(h, p64("conv4-1"), p64("conv4-1", 1))),
            conv(h, p64("conv4-2"), p64("conv4-2", 1)))


def rnet_reference(p64, x):
    h = max_pool(prelu(conv(x, p64("conv1"), p64("conv1", 1)), p64("prelu1")), 3, 2)
    h = prelu(conv(h, p64("conv2"), p64("conv2", 1)), p64("prelu2"))
    h = prelu(h.reshape(len(h), -1) @ p64("conv4").T + p64("conv4", 1), p64("prelu4"))
    return (softmax(h @ p64("conv5-1").T + p64("conv5-1", 1)),
            h @ p64("conv5-2").T + p64("conv5-2", 1))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "openvino"])
def test_mtcnn_pyramid_and_box_batches_equal_float64(tmp_path, monkeypatch, engine):
    monkeypatch.setenv("CAFFE_COMPAT_ENGINE", engine)      # the script itself is unchanged
    caffe.set_mode_cpu()
    PNet = caffe.Net(write(tmp_path, "det1.prototxt", PNET), caffe.TEST)
    RNet = caffe.Net(write(tmp_path, "det2.prototxt", RNET), caffe.TEST)
    rng = np.random.default_rng(0)
    _slopes(PNet, ["PReLU1", "PReLU2"], rng)
    _slopes(RNet, ["prelu1", "prelu2", "prelu4"], rng)
    img = rng.uniform(0, 255, (64, 80, 3))
    pw, rw = params64(PNet), params64(RNet)
    shapes = set()
    for _ in range(2):                                # a second image: the shapes come back
        minl, m, factor, scales = 64 * 12.0 / 12, 12.0 / 12, 0.709, []
        while minl >= 12:
            scales.append(m * pow(factor, len(scales)))
            minl *= factor
        for scale in scales:
            hs, ws = int(np.ceil(64 * scale)), int(np.ceil(80 * scale))
            im_data = (cv2.resize(img, (ws, hs)) - 127.5) * 0.0078125
            im_data = np.array([np.swapaxes(im_data, 0, 2)], dtype=np.float64)
            PNet.blobs["data"].reshape(1, 3, ws, hs)
            PNet.blobs["data"].data[...] = im_data
            out = PNet.forward()
            prob, reg = pnet_reference(pw, im_data)
            np.testing.assert_allclose(out["prob1"], prob, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(out["conv4-2"][0], reg[0], rtol=1e-4, atol=1e-4)
            shapes.add(out["prob1"].shape)
    assert len(shapes) == 5
    for numbox in (3, 7, 1, 7):
        tempimg = rng.uniform(-1, 1, (numbox, 3, 24, 24))
        RNet.blobs["data"].reshape(numbox, 3, 24, 24)
        RNet.blobs["data"].data[...] = tempimg
        out = RNet.forward()
        prob, reg = rnet_reference(rw, tempimg)
        np.testing.assert_allclose(out["prob1"][:, 1], prob[:, 1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["conv5-2"], reg, rtol=1e-4, atol=1e-4)
        assert RNet.blobs["conv4"].data.shape == (numbox, 16)
    assert RNet.engine == engine


# -- HED: side outputs upsampled by bilinear Deconvolution, cropped, fused ---------------
def upsample_filt(size):
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    return (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)


def interp_surgery(net, layers):
    for l in layers:
        m, k, h, w = net.params[l][0].data.shape
        assert m == k and h == w, "input + output channels / square filters"
        net.params[l][0].data[range(m), range(k), :, :] = upsample_filt(h)


HED = ('input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 16\ninput_dim: 16\n'
       + layer("conv1_1", "Convolution", "data", "conv1_1", cv(4, 3, "pad: 1"))
       + layer("relu1_1", "ReLU", "conv1_1", "conv1_1")
       + layer("pool1", "Pooling", "conv1_1", "pool1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
       + layer("conv2_1", "Convolution", "pool1", "conv2_1", cv(4, 3, "pad: 1"))
       + layer("score-dsn1", "Convolution", "conv1_1", "upscore-dsn1", cv(1, 1))
       + layer("sigmoid-dsn1", "Sigmoid", "upscore-dsn1", "sigmoid-dsn1")
       + layer("score-dsn2", "Convolution", "conv2_1", "score-dsn2", cv(1, 1))
       + layer("upsample_2", "Deconvolution", "score-dsn2", "score-dsn2-up",
               "convolution_param { kernel_size: 4 stride: 2 num_output: 1 }")
       + layer("crop", "Crop", "score-dsn2-up data", "upscore-dsn2", "crop_param { offset: 1 }")
       + layer("sigmoid-dsn2", "Sigmoid", "upscore-dsn2", "sigmoid-dsn2")
       + layer("concat", "Concat", "upscore-dsn1 upscore-dsn2", "concat-upscore",
               "concat_param { concat_dim: 1 }")
       + layer("new-score-weighting", "Convolution", "concat-upscore", "upscore-fuse",
               'convolution_param { num_output: 1 kernel_size: 1 weight_filler { type: "constant" value: 0.2 } }')
       + layer("sigmoid-fuse", "Sigmoid", "upscore-fuse", "sigmoid-fuse"))


def test_hed_side_outputs_at_two_image_sizes(tmp_path):
    net = caffe.Net(write(tmp_path, "deploy.prototxt", HED), caffe.TEST)
    interp_surgery(net, [k for k in net.params.keys() if "up" in k])
    rng = np.random.default_rng(1)
    for h, w in ((16, 16), (20, 12)):
        in_ = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)[:, :, ::-1]
        in_ -= np.array((104.00698793, 116.66876762, 122.67891434))
        in_ = in_.transpose((2, 0, 1))
        net.blobs["data"].reshape(1, *in_.shape)
        net.blobs["data"].data[...] = in_
        net.forward()
        x = in_[None].astype(np.float64)
        c1 = np.maximum(conv(x, p64(net, "conv1_1"), p64(net, "conv1_1", 1), pad=1), 0)
        c2 = conv(max_pool(c1, 2, 2), p64(net, "conv2_1"), p64(net, "conv2_1", 1), pad=1)
        d1 = conv(c1, p64(net, "score-dsn1"), p64(net, "score-dsn1", 1))
        up = deconv(conv(c2, p64(net, "score-dsn2"), p64(net, "score-dsn2", 1)),
                    p64(net, "upsample_2"), 2) + p64(net, "upsample_2", 1)
        d2 = up[:, :, 1:1 + h, 1:1 + w]
        fuse = conv(np.concatenate([d1, d2], 1), p64(net, "new-score-weighting"),
                    p64(net, "new-score-weighting", 1))
        sig = lambda v: 1 / (1 + np.exp(-v))   # noqa: E731
        for blob, want in (("sigmoid-dsn1", d1), ("sigmoid-dsn2", d2), ("sigmoid-fuse", fuse)):
            got = net.blobs[blob].data[0][0, :, :]
            assert got.shape == (h, w)
            np.testing.assert_allclose(got, sig(want[0, 0]), rtol=1e-4, atol=1e-5)


# -- FCN: a VOC-style Python data layer, surgery, SGDSolver and seg_tests ---------------
VOC_LAYERS = '''
import caffe
import numpy as np
from PIL import Image


class SegDataLayer(caffe.Layer):
    def setup(self, bottom, top):
        params = eval(self.param_str)
        self.voc_dir, self.mean = params['voc_dir'], np.array(params['mean'])
        if len(top) != 2:
            raise Exception("Need to define two tops: data and label.")
        split_f = '{}/{}.txt'.format(self.voc_dir, params['split'])
        self.indices = open(split_f, 'r').read().splitlines()
        self.idx = 0

    def reshape(self, bottom, top):
        idx = self.indices[self.idx]
        in_ = np.array(Image.open('{}/{}.jpg'.format(self.voc_dir, idx)), dtype=np.float32)
        in_ = in_[:, :, ::-1]
        in_ -= self.mean
        self.data = in_.transpose((2, 0, 1))
        label = np.array(Image.open('{}/{}.png'.format(self.voc_dir, idx)), dtype=np.uint8)
        self.label = label[np.newaxis, ...]
        top[0].reshape(1, *self.data.shape)
        top[1].reshape(1, *self.label.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.data
        top[1].data[...] = self.label
        self.idx = (self.idx + 1) % len(self.indices)

    def backward(self, top, propagate_down, bottom):
        pass
'''


def fcn_net(split, voc_dir, loss=True):
    mean = (104.00698793, 116.66876762, 122.67891434)
    head = (layer("data", "Python", "", "data label",
                  "python_param { module: 'voc_layers' layer: 'SegDataLayer' param_str: \"%s\" }"
                  % dict(voc_dir=voc_dir, split=split, mean=mean)) if loss else
            'input: "data" input_shape { dim: 1 dim: 3 dim: 10 dim: 10 }\n')
    return (head + layer("conv1", "Convolution", "data", "conv1", cv(4, 3, "pad: 1"))
            + layer("relu1", "ReLU", "conv1", "conv1")
            + layer("pool1", "Pooling", "conv1", "pool1", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
            + layer("score_fr", "Convolution", "pool1", "score_fr", cv(3, 1))
            + layer("upscore", "Deconvolution", "score_fr", "upscore",
                    "param { lr_mult: 0 } convolution_param { num_output: 3 kernel_size: 4 "
                    "stride: 2 bias_term: false }")
            + layer("score", "Crop", "upscore data", "score", "crop_param { axis: 2 offset: 1 }")
            + (layer("loss", "SoftmaxWithLoss", "score label", "loss",
                     "loss_param { ignore_label: 255 normalize: false }") if loss else ""))


def fcn_reference(p64, in_):
    h = max_pool(np.maximum(conv(in_[None].astype(np.float64), p64("conv1"), p64("conv1", 1),
                                 pad=1), 0), 2, 2)
    up = deconv(conv(h, p64("score_fr"), p64("score_fr", 1)), p64("upscore"), 2)
    return up[0, :, 1:1 + in_.shape[1], 1:1 + in_.shape[2]]


def fast_hist(a, b, n):
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n ** 2).reshape(n, n)


def compute_hist(net, dataset, layer="score", gt="label"):
    n_cl = net.blobs[layer].channels
    hist, loss, scores = np.zeros((n_cl, n_cl)), 0, []
    for idx in dataset:
        net.forward()
        hist += fast_hist(net.blobs[gt].data[0, 0].flatten(),
                          net.blobs[layer].data[0].argmax(0).flatten(), n_cl)
        scores.append((net.blobs["data"].data[0].copy(), net.blobs[gt].data[0, 0].copy(),
                       net.blobs[layer].data[0].copy()))
        loss += net.blobs["loss"].data.flat[0]
    return hist, loss / len(dataset), scores


def transplant(new_net, net, suffix=""):
    for p in net.params:
        p_new = p + suffix
        if p_new not in new_net.params:
            continue
        for i in range(len(net.params[p])):
            if i > (len(new_net.params[p_new]) - 1):
                break
            new_net.params[p_new][i].data.flat = net.params[p][i].data.flat


def _voc_dir(tmp_path, sizes):
    rng = np.random.default_rng(2)
    names = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.jpg")
        label = rng.integers(0, 3, (h, w)).astype(np.uint8)
        label[0, :] = 255                                   # VOC's void border
        Image.fromarray(label).save(tmp_path / f"im{i}.png")
        names.append(f"im{i}")
    (tmp_path / "val.txt").write_text("\n".join(names))
    (tmp_path / "train.txt").write_text("\n".join(names))
    return names


def test_fcn_solve_surgery_and_seg_tests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "voc_layers.py").write_text(VOC_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    val = np.array(_voc_dir(tmp_path, [(10, 12), (14, 8), (8, 8)]), dtype=str)
    write(tmp_path, "train.prototxt", fcn_net("train", str(tmp_path)))
    write(tmp_path, "val.prototxt", fcn_net("val", str(tmp_path)))
    write(tmp_path, "solver.prototxt", 'train_net: "train.prototxt" test_net: "val.prototxt" '
          'test_iter: 3 test_interval: 999 base_lr: 1e-4 momentum: 0.9 lr_policy: "fixed" '
          'display: 0 max_iter: 100 snapshot: 0 snapshot_prefix: "fcn" random_seed: 5')
    solver = caffe.SGDSolver("solver.prototxt")
    interp_surgery(solver.net, [k for k in solver.net.params.keys() if "up" in k])
    np.testing.assert_array_equal(solver.net.params["upscore"][0].data[1, 1], upsample_filt(4))
    assert solver.net.params["upscore"][0].data[0, 1].max() == 0
    solver.step(4)
    solver.test_nets[0].share_with(solver.net)
    hist, loss, scores = compute_hist(solver.test_nets[0], val)
    p64 = params64(solver.net)
    want_hist, want_loss = np.zeros((3, 3)), 0.0
    for data, label, score in scores:
        want = fcn_reference(p64, data)
        np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-4)
        keep = label != 255
        want_hist += fast_hist(label[keep].astype(int), want.argmax(0)[keep], 3)
        # Caffe: -log(max(p, FLT_MIN)) per pixel; normalize: false divides by N (1)
        logp = np.log(softmax(want[None]))[0]
        nll = -np.take_along_axis(logp, np.where(keep, label, 0)[None].astype(int), 0)[0]
        want_loss += np.minimum(nll, -np.log(np.finfo(np.float32).tiny))[keep].sum()
    assert hist.sum() == sum(d.shape[1] * d.shape[2] - d.shape[2] for d, _, _ in scores)
    np.testing.assert_array_equal(hist, want_hist)
    assert loss == pytest.approx(want_loss / 3, rel=1e-4)
    assert [s[0].shape[1:] for s in scores] == [(10, 12), (14, 8), (8, 8)]
    assert solver.iter == 4
    # infer.py on a deploy net whose weights were transplanted from the trained one
    deploy = caffe.Net(write(tmp_path, "deploy.prototxt", fcn_net("", "", loss=False)),
                       caffe.TEST)
    transplant(deploy, solver.net)
    in_ = scores[1][0]
    deploy.blobs["data"].reshape(1, *in_.shape)
    deploy.blobs["data"].data[...] = in_
    deploy.forward()
    out = deploy.blobs["score"].data[0].argmax(axis=0)
    np.testing.assert_array_equal(out, fcn_reference(p64, in_).argmax(0))


# -- py-faster-rcnn: im_detect, the RPN proposal layer, RoIDataLayer + snapshot --------
def roi_pool(x, rois, ph, pw, scale):
    """Fast R-CNN's ROIPooling: C round() corners, float bin sizes, floor/ceil bins."""
    out = np.zeros((len(rois), x.shape[1], ph, pw))
    H, W = x.shape[2:]
    for r, (b, *box) in enumerate(rois):
        x1, y1, x2, y2 = (np.floor(np.float64(v) * scale + 0.5) for v in box)
        bh, bw = max(y2 - y1 + 1, 1) / ph, max(x2 - x1 + 1, 1) / pw
        for i in range(ph):
            for j in range(pw):
                hs, he = (int(min(max(v, 0), H)) for v in (np.floor(i * bh) + y1, np.ceil((i + 1) * bh) + y1))
                ws, we = (int(min(max(v, 0), W)) for v in (np.floor(j * bw) + x1, np.ceil((j + 1) * bw) + x1))
                if he > hs and we > ws:
                    out[r, :, i, j] = x[int(b), :, hs:he, ws:we].max(axis=(1, 2))
    return out


def frcnn_head(rois):
    return (layer("conv1", "Convolution", "data", "conv1", cv(4, 3, "pad: 1"))
            + layer("relu1", "ReLU", "conv1", "conv1")
            + layer("roi_pool5", "ROIPooling", f"conv1 {rois}", "pool5",
                    "roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.5 }")
            + layer("cls_score", "InnerProduct", "pool5", "cls_score", ip(3))
            + layer("bbox_pred", "InnerProduct", "pool5", "bbox_pred", ip(12)))


def frcnn_reference(p64, data, rois):
    pooled = roi_pool(np.maximum(conv(data.astype(np.float64), p64("conv1"), p64("conv1", 1),
                                      pad=1), 0), rois, 2, 2, 0.5).reshape(len(rois), -1)
    return (pooled @ p64("cls_score").T + p64("cls_score", 1),
            pooled @ p64("bbox_pred").T + p64("bbox_pred", 1))


def test_fast_rcnn_im_detect_with_data_and_rois(tmp_path):
    text = ('input: "data" input_shape { dim: 1 dim: 3 dim: 20 dim: 20 }\n'
            'input: "rois" input_shape { dim: 1 dim: 5 }\n' + frcnn_head("rois")
            + layer("cls_prob", "Softmax", "cls_score", "cls_prob"))
    net = caffe.Net(write(tmp_path, "test.prototxt", text), caffe.TEST)
    p64, rng = params64(net), np.random.default_rng(3)
    for (h, w), r in (((20, 26), 4), ((30, 18), 7)):
        blobs = {"data": rng.normal(size=(1, 3, h, w)) * 50}
        x1, y1 = rng.uniform(0, w / 2, r), rng.uniform(0, h / 2, r)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, r), y1 + rng.uniform(1, h / 2, r)], 1)
        blobs["rois"] = np.hstack((np.zeros((r, 1)), boxes)).astype(np.float32, copy=False)
        net.blobs["data"].reshape(*(blobs["data"].shape))
        net.blobs["rois"].reshape(*(blobs["rois"].shape))
        forward_kwargs = {"data": blobs["data"].astype(np.float32, copy=False),
                          "rois": blobs["rois"].astype(np.float32, copy=False)}
        blobs_out = net.forward(**forward_kwargs)
        score, deltas = frcnn_reference(p64, forward_kwargs["data"], blobs["rois"])
        np.testing.assert_allclose(net.blobs["cls_score"].data, score, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(blobs_out["cls_prob"], softmax(score), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(blobs_out["bbox_pred"], deltas, rtol=1e-4, atol=1e-3)


PROPOSAL = '''
import ast
import caffe
import numpy as np

CFG = {"TRAIN": {"POST_NMS_TOP_N": 5}, "TEST": {"POST_NMS_TOP_N": 3}}


class ProposalLayer(caffe.Layer):
    """The best-scoring anchors (one per cell, side 2*stride) as rois (n, x1, y1, x2, y2)."""

    def setup(self, bottom, top):
        layer_params = ast.literal_eval(self.param_str_)   # py-faster-rcnn: yaml.load
        self._feat_stride = layer_params['feat_stride']
        top[0].reshape(1, 5)

    def forward(self, bottom, top):
        assert bottom[0].data.shape[0] == 1, 'Only single item batches are supported'
        post_nms_topN = CFG[str(self.phase)]["POST_NMS_TOP_N"]
        scores = bottom[0].data[:, 1:, :, :]                # the fg probabilities
        im_info = bottom[1].data[0, :]
        height, width = scores.shape[-2:]
        shift_x, shift_y = np.meshgrid(np.arange(width), np.arange(height))
        cells = np.vstack((shift_x.ravel(), shift_y.ravel())).T * self._feat_stride
        proposals = np.hstack((cells, cells + 2 * self._feat_stride - 1)).astype(np.float64)
        proposals = np.minimum(proposals, [im_info[1] - 1, im_info[0] - 1] * 2)
        order = scores.transpose((0, 2, 3, 1)).ravel().argsort()[::-1][:post_nms_topN]
        proposals = proposals[order, :]
        batch_inds = np.zeros((proposals.shape[0], 1), dtype=np.float32)
        blob = np.hstack((batch_inds, proposals.astype(np.float32, copy=False)))
        top[0].reshape(*(blob.shape))
        top[0].data[...] = blob

    def backward(self, top, propagate_down, bottom):
        pass

    def reshape(self, bottom, top):
        pass
'''


@pytest.mark.parametrize("phase, keep", [(caffe.TEST, 3), (caffe.TRAIN, 5)])
def test_faster_rcnn_proposals_feed_roi_pooling(tmp_path, monkeypatch, phase, keep):
    (tmp_path / "rpn_layers.py").write_text(PROPOSAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = ('input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }\n'
            'input: "im_info" input_shape { dim: 1 dim: 3 }\n'
            + layer("rpn_cls_score", "Convolution", "data", "rpn_cls_score", cv(2, 2, "stride: 2"))
            + layer("rpn_cls_score_reshape", "Reshape", "rpn_cls_score", "rpn_cls_score_reshape",
                    "reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } }")
            + layer("rpn_cls_prob", "Softmax", "rpn_cls_score_reshape", "rpn_cls_prob")
            + layer("rpn_cls_prob_reshape", "Reshape", "rpn_cls_prob", "rpn_cls_prob_reshape",
                    "reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } }")
            + layer("proposal", "Python", "rpn_cls_prob_reshape im_info", "rois",
                    "python_param { module: 'rpn_layers' layer: 'ProposalLayer' "
                    "param_str: \"{'feat_stride': 2}\" }")
            + frcnn_head("rois") + layer("cls_prob", "Softmax", "cls_score", "cls_prob"))
    net = caffe.Net(write(tmp_path, "faster.prototxt", text), phase)
    p64, rng = params64(net), np.random.default_rng(4)
    for h, w, im_scale in ((16, 16, 1.0), (12, 22, 0.5)):
        im_blob = rng.normal(size=(1, 3, h, w))        # unsaturated: no tied scores
        blobs = {"data": im_blob, "im_info": np.array(
            [[im_blob.shape[2], im_blob.shape[3], im_scale]], dtype=np.float32)}
        net.blobs["data"].reshape(*(blobs["data"].shape))
        net.blobs["im_info"].reshape(*(blobs["im_info"].shape))
        blobs_out = net.forward(data=blobs["data"].astype(np.float32, copy=False),
                                im_info=blobs["im_info"].astype(np.float32, copy=False))
        rois = net.blobs["rois"].data.copy()
        boxes = rois[:, 1:5] / im_scale
        fg = softmax(conv(net.blobs["data"].data.astype(np.float64), p64("rpn_cls_score"),
                          p64("rpn_cls_score", 1), stride=2))[0, 1]
        best = np.argsort(fg.ravel())[::-1][:keep]
        ys, xs = np.unravel_index(best, fg.shape)
        want = np.minimum(np.stack([xs * 2, ys * 2, xs * 2 + 3, ys * 2 + 3], 1), [w - 1, h - 1] * 2)
        np.testing.assert_array_equal(boxes * im_scale, want)
        score, _ = frcnn_reference(p64, net.blobs["data"].data, rois)
        assert blobs_out["cls_prob"].shape == (keep, 3)
        np.testing.assert_allclose(blobs_out["cls_prob"], softmax(score), rtol=1e-4, atol=1e-6)


ROI_DATA = '''
import ast
import caffe
import numpy as np


class RoIDataLayer(caffe.Layer):
    """One image and its sampled RoIs per step, from the roidb the trainer hands over."""

    def set_roidb(self, roidb):
        self._roidb = roidb
        self._cur = 0

    def setup(self, bottom, top):
        layer_params = ast.literal_eval(self.param_str_)   # py-faster-rcnn: yaml.load
        self._num_classes = layer_params['num_classes']
        self._name_to_top_map = {}
        for idx, (name, shape) in enumerate([
                ('data', (1, 3, 20, 20)), ('rois', (1, 5)), ('labels', (1,)),
                ('bbox_targets', (1, self._num_classes * 4)),
                ('bbox_inside_weights', (1, self._num_classes * 4)),
                ('bbox_outside_weights', (1, self._num_classes * 4))]):
            top[idx].reshape(*shape)
            self._name_to_top_map[name] = idx
        assert len(top) == len(self._name_to_top_map)

    def forward(self, bottom, top):
        blobs = self._roidb[self._cur % len(self._roidb)]
        self._cur += 1
        for blob_name, blob in blobs.items():
            top_ind = self._name_to_top_map[blob_name]
            top[top_ind].reshape(*(blob.shape))
            top[top_ind].data[...] = blob.astype(np.float32, copy=False)

    def backward(self, top, propagate_down, bottom):
        pass

    def reshape(self, bottom, top):
        pass
'''


def _roidb(rng, n_cls=3):
    roidb = []
    for (h, w), r in (((20, 24), 5), ((16, 20), 3)):
        x1, y1 = rng.uniform(0, w / 2, r), rng.uniform(0, h / 2, r)
        boxes = np.stack([x1, y1, x1 + rng.uniform(2, w / 2, r), y1 + rng.uniform(2, h / 2, r)], 1)
        labels = rng.integers(0, n_cls, r).astype(np.float64)
        weights = np.zeros((r, 4 * n_cls))
        for i, c in enumerate(labels.astype(int)):
            weights[i, 4 * c:4 * c + 4] = c > 0
        roidb.append({"data": rng.normal(size=(1, 3, h, w)), "labels": labels,
                      "rois": np.hstack([np.zeros((r, 1)), boxes]),
                      "bbox_targets": rng.normal(size=(r, 4 * n_cls)) * weights,
                      "bbox_inside_weights": weights, "bbox_outside_weights": weights})
    return roidb


def test_faster_rcnn_training_with_roi_data_layer_and_snapshot(tmp_path, monkeypatch):
    import google.protobuf as pb2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "roi_data_layer.py").write_text(ROI_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path, "train.prototxt", layer(
        "input-data", "Python", "", "data rois labels bbox_targets bbox_inside_weights "
        "bbox_outside_weights", "python_param { module: 'roi_data_layer' layer: 'RoIDataLayer' "
        "param_str: \"{'num_classes': 3}\" }") + frcnn_head("rois")
        + layer("loss_cls", "SoftmaxWithLoss", "cls_score labels", "loss_cls")
        + layer("loss_bbox", "SmoothL1Loss", "bbox_pred bbox_targets bbox_inside_weights "
                "bbox_outside_weights", "loss_bbox"))
    solver_prototxt = write(tmp_path, "solver.prototxt",
                            'train_net: "train.prototxt" base_lr: 0.001 lr_policy: "fixed" '
                            'momentum: 0.9 display: 20 snapshot: 0 snapshot_prefix: "frcnn"')
    rng = np.random.default_rng(5)
    roidb = _roidb(rng)
    solver = caffe.SGDSolver(solver_prototxt)
    solver_param = caffe_pb2.SolverParameter()
    with open(solver_prototxt, "rt") as f:
        pb2.text_format.Merge(f.read(), solver_param)
    solver.net.layers[0].set_roidb(roidb)
    while solver.iter < 3:
        solver.step(1)
        net, blob = solver.net, roidb[(solver.iter - 1) % 2]
        assert net.blobs["labels"].data.shape == blob["labels"].shape
        p = softmax(net.blobs["cls_score"].data.astype(np.float64))
        want = -np.log(p[np.arange(len(p)), blob["labels"].astype(int)]).mean()
        assert net.blobs["loss_cls"].data == pytest.approx(want, rel=1e-5)
        d = (net.blobs["bbox_pred"].data - blob["bbox_targets"]) * blob["bbox_inside_weights"]
        l1 = np.where(abs(d) < 1, 0.5 * d * d, abs(d) - 0.5) * blob["bbox_outside_weights"]
        assert net.blobs["loss_bbox"].data == pytest.approx(l1.sum() / len(d), rel=1e-5)
    # SolverWrapper.snapshot: unnormalize bbox_pred, save, restore
    stds, means = rng.uniform(0.1, 0.3, 12), rng.normal(size=12) * 0.1
    net = solver.net
    orig_0 = net.params["bbox_pred"][0].data.copy()
    orig_1 = net.params["bbox_pred"][1].data.copy()
    net.params["bbox_pred"][0].data[...] = net.params["bbox_pred"][0].data * stds[:, np.newaxis]
    net.params["bbox_pred"][1].data[...] = net.params["bbox_pred"][1].data * stds + means
    filename = solver_param.snapshot_prefix + "_iter_{:d}".format(solver.iter) + ".caffemodel"
    net.save(str(filename))
    net.params["bbox_pred"][0].data[...] = orig_0
    net.params["bbox_pred"][1].data[...] = orig_1
    test = caffe.Net(write(tmp_path, "test.prototxt", 'input: "data" input_shape { dim: 1 dim: 3 '
                           'dim: 9 dim: 9 }\ninput: "rois" input_shape { dim: 1 dim: 5 }\n'
                           + frcnn_head("rois")), "frcnn_iter_3.caffemodel", caffe.TEST)
    np.testing.assert_allclose(test.params["bbox_pred"][0].data, orig_0 * stds[:, None], rtol=1e-6)
    np.testing.assert_allclose(test.params["bbox_pred"][1].data, orig_1 * stds + means, rtol=1e-6)
    np.testing.assert_array_equal(net.params["cls_score"][0].data, test.params["cls_score"][0].data)
    solver.step(1)                                # trains on from the restored weights
    assert not np.allclose(net.params["bbox_pred"][0].data, test.params["bbox_pred"][0].data)
    assert np.abs(net.params["bbox_pred"][0].data - orig_0).max() < 0.05
