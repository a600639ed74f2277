"""Detection and segmentation scripts from other repositories, in their style, run unchanged
through ``import caffe`` and checked against float64 numpy: MTCNN's image pyramid
(DuinoDu/mtcnn ``demo.py``), HED's side outputs (s9xie/hed), FCN's data layer, NetSpec,
surgery, solving and scoring (shelhamer/fcn.berkeleyvision.org), py-faster-rcnn's
``im_detect``, proposal and RoI data layers and snapshot (rbgirshick/py-faster-rcnn) and
SSD's ``ssd_detect.py`` (weiliu89/caffe). (Our own scripts, written after reading theirs.)"""
from __future__ import division

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

import caffe
from caffe import layers as L, params as P
from caffe.coord_map import crop
from caffe.proto import caffe_pb2
from detect_reference import (FLT_MIN, HED, PNET, RNET, conv, deconv, frcnn_head, frcnn_net,
                              frcnn_reference, layer, max_pool, params64, pnet_reference,
                              random_rois, rnet_reference, softmax, write)


# -- MTCNN: a P-Net image pyramid, then R-Net on batches of boxes ------------------------
@pytest.mark.parametrize("engine", ["torch", "onnxruntime", "openvino"])
def test_mtcnn_pyramid_and_box_batches_equal_float64(tmp_path, monkeypatch, engine):
    if engine != "torch":
        pytest.importorskip(engine)                    # optional extras of the package
    monkeypatch.setenv("CAFFE_COMPAT_ENGINE", engine)      # the script itself is unchanged
    caffe.set_mode_cpu()
    PNet = caffe.Net(write(tmp_path, "det1.prototxt", PNET), caffe.TEST)
    RNet = caffe.Net(write(tmp_path, "det2.prototxt", RNET), caffe.TEST)
    rng = np.random.default_rng(0)
    for net, names in ((PNet, ["PReLU1", "PReLU2"]), (RNet, ["prelu1", "prelu2", "prelu4"])):
        for name in names:
            net.params[name][0].data[...] = rng.uniform(-0.5, 0.5, net.params[name][0].data.shape)
    pw, rw = params64(PNet), params64(RNet)
    img, shapes = rng.uniform(0, 255, (64, 80, 3)), set()
    for _ in range(2):                       # a second image: the five shapes come back
        minl, m, factor, scales = 64.0, 1.0, 0.709, []
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


def test_hed_side_outputs_at_two_image_sizes(tmp_path):
    net = caffe.Net(write(tmp_path, "deploy.prototxt", HED), caffe.TEST)
    interp_surgery(net, [k for k in net.params.keys() if "up" in k])
    p, rng = params64(net), np.random.default_rng(1)
    for h, w in ((16, 16), (20, 12)):
        in_ = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)[:, :, ::-1]
        in_ -= np.array((104.00698793, 116.66876762, 122.67891434))
        in_ = in_.transpose((2, 0, 1))
        net.blobs["data"].reshape(1, *in_.shape)
        net.blobs["data"].data[...] = in_
        net.forward()
        c1 = np.maximum(conv(in_[None].astype(np.float64), p("conv1_1"), p("conv1_1", 1), pad=1), 0)
        c2 = conv(max_pool(c1, 2, 2), p("conv2_1"), p("conv2_1", 1), pad=1)
        d1 = conv(c1, p("score-dsn1"), p("score-dsn1", 1))
        up = deconv(conv(c2, p("score-dsn2"), p("score-dsn2", 1)), p("upsample_2"), 2) + p("upsample_2", 1)
        d2 = up[:, :, 1:1 + h, 1:1 + w]
        fuse = conv(np.concatenate([d1, d2], 1), p("new-score-weighting"), p("new-score-weighting", 1))
        for blob, want in (("sigmoid-dsn1", d1), ("sigmoid-dsn2", d2), ("sigmoid-fuse", fuse)):
            got = net.blobs[blob].data[0][0, :, :]
            assert got.shape == (h, w)
            np.testing.assert_allclose(got, 1 / (1 + np.exp(-want[0, 0])), rtol=1e-4, atol=1e-5)


# -- FCN: a VOC-style Python data layer, NetSpec, surgery, SGDSolver and seg_tests -------
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
        self.indices, self.idx = open(split_f, 'r').read().splitlines(), 0

    def reshape(self, bottom, top):
        name = '{}/{}'.format(self.voc_dir, self.indices[self.idx])
        in_ = np.array(Image.open(name + '.jpg'), dtype=np.float32)[:, :, ::-1] - self.mean
        self.data = in_.transpose((2, 0, 1))
        self.label = np.array(Image.open(name + '.png'), dtype=np.uint8)[np.newaxis, ...]
        top[0].reshape(1, *self.data.shape)
        top[1].reshape(1, *self.label.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.data
        top[1].data[...] = self.label
        self.idx = (self.idx + 1) % len(self.indices)
'''


def fcn(split, voc_dir):
    n = caffe.NetSpec()
    if split:
        pydata_params = dict(split=split, mean=(104.00699, 116.66877, 122.67892), voc_dir=voc_dir)
        n.data, n.label = L.Python(module="voc_layers", layer="SegDataLayer", ntop=2,
                                   param_str=str(pydata_params))
    else:
        n.data = L.Input(shape=dict(dim=[1, 3, 10, 10]))
    filler = dict(weight_filler=dict(type="gaussian", std=0.3), bias_filler=dict(type="gaussian", std=0.1))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=4, pad=1, **filler)
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.score_fr = L.Convolution(n.pool1, num_output=3, kernel_size=1, pad=0, **filler)
    n.upscore = L.Deconvolution(n.score_fr, convolution_param=dict(
        num_output=3, kernel_size=4, stride=2, bias_term=False), param=[dict(lr_mult=0)])
    n.score = crop(n.upscore, n.data)
    if split:
        n.loss = L.SoftmaxWithLoss(n.score, n.label, loss_param=dict(normalize=False, ignore_label=255))
    return n.to_proto()


def fcn_reference(p, in_):
    h = max_pool(np.maximum(conv(in_[None].astype(np.float64), p("conv1"), p("conv1", 1), pad=1), 0), 2, 2)
    up = deconv(conv(h, p("score_fr"), p("score_fr", 1)), p("upscore"), 2)
    return up[0, :, 1:1 + in_.shape[1], 1:1 + in_.shape[2]]


def fast_hist(a, b, n):
    k = (a >= 0) & (a < n)
    return np.bincount(n * a[k].astype(int) + b[k], minlength=n ** 2).reshape(n, n)


def compute_hist(net, dataset, layer="score", gt="label"):
    n_cl = net.blobs[layer].channels
    hist, loss, seen = np.zeros((n_cl, n_cl)), 0, []
    for idx in dataset:
        net.forward()
        hist += fast_hist(net.blobs[gt].data[0, 0].flatten(),
                          net.blobs[layer].data[0].argmax(0).flatten(), n_cl)
        loss += net.blobs["loss"].data.flat[0]
        seen.append((net.blobs["data"].data[0].copy(), net.blobs[gt].data[0, 0].astype(int)))
    return hist, loss / len(dataset), seen


def transplant(new_net, net, suffix=""):
    for p in net.params:
        if p + suffix in new_net.params:
            for i in range(min(len(net.params[p]), len(new_net.params[p + suffix]))):
                new_net.params[p + suffix][i].data.flat = net.params[p][i].data.flat


def test_fcn_solve_surgery_and_seg_tests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path, "voc_layers.py", VOC_LAYERS)
    rng, sizes = np.random.default_rng(2), [(10, 12), (14, 8), (8, 8)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f"im{i}.jpg")
        label = rng.integers(0, 3, (h, w)).astype(np.uint8)
        label[0, :] = 255                                   # VOC's void border
        Image.fromarray(label).save(f"im{i}.png")
    write(tmp_path, "val.txt", "im0\nim1\nim2")
    write(tmp_path, "train.prototxt", fcn("val", str(tmp_path)))
    write(tmp_path, "val.prototxt", fcn("val", str(tmp_path)))
    write(tmp_path, "solver.prototxt", 'train_net: "train.prototxt" test_net: "val.prototxt" '
          'test_iter: 3 test_interval: 999 base_lr: 1e-4 momentum: 0.9 lr_policy: "fixed" '
          'display: 0 max_iter: 100 snapshot: 0 snapshot_prefix: "fcn" random_seed: 5')
    val = np.loadtxt("val.txt", dtype=str)
    solver = caffe.SGDSolver("solver.prototxt")
    interp_surgery(solver.net, [k for k in solver.net.params.keys() if "up" in k])
    np.testing.assert_array_equal(solver.net.params["upscore"][0].data[1, 1], upsample_filt(4))
    assert solver.net.params["upscore"][0].data[0, 1].max() == 0
    solver.step(4)
    solver.test_nets[0].share_with(solver.net)            # score.seg_tests
    hist, loss, seen = compute_hist(solver.test_nets[0], val)
    p, want_hist, want_loss = params64(solver.net), np.zeros((3, 3)), 0.0
    for data, label in seen:
        want, keep = fcn_reference(p, data), label != 255
        want_hist += fast_hist(label[keep], want.argmax(0)[keep], 3)
        nll = -np.take_along_axis(np.log(softmax(want[None]))[0], np.where(keep, label, 0)[None], 0)[0]
        want_loss += np.minimum(nll, -np.log(FLT_MIN))[keep].sum()   # Caffe: max(p, FLT_MIN)
    assert [d.shape[1:] for d, _ in seen] == sizes and solver.iter == 4
    np.testing.assert_array_equal(hist, want_hist)
    assert hist.sum() == sum(h * w - w for h, w in sizes)
    assert loss == pytest.approx(want_loss / 3, rel=1e-4)        # normalize: false: / N (1)
    # infer.py on a deploy net whose weights were transplanted from the trained one
    deploy = caffe.Net(write(tmp_path, "deploy.prototxt", fcn("", "")), caffe.TEST)
    transplant(deploy, solver.net)
    in_ = seen[1][0]
    deploy.blobs["data"].reshape(1, *in_.shape)
    deploy.blobs["data"].data[...] = in_
    deploy.forward()
    out = deploy.blobs["score"].data[0].argmax(axis=0)
    np.testing.assert_array_equal(out, fcn_reference(p, in_).argmax(0))


# -- py-faster-rcnn: im_detect, the RPN proposal layer, RoIDataLayer + snapshot --------
FRCNN_LAYERS = '''
import ast
import caffe
import numpy as np

CFG = {"TRAIN": {"POST_NMS_TOP_N": 5}, "TEST": {"POST_NMS_TOP_N": 3}}


class ProposalLayer(caffe.Layer):
    """The best-scoring anchors (one per cell, side 2 * stride) as rois (n, x1, y1, x2, y2)."""

    def setup(self, bottom, top):
        self._feat_stride = ast.literal_eval(self.param_str_)['feat_stride']   # yaml.load
        top[0].reshape(1, 5)

    def forward(self, bottom, top):
        assert bottom[0].data.shape[0] == 1, 'Only single item batches are supported'
        post_nms_topN = CFG[str(self.phase)]["POST_NMS_TOP_N"]
        scores, im_info = bottom[0].data[:, 1:, :, :], bottom[1].data[0, :]
        shift_x, shift_y = np.meshgrid(np.arange(scores.shape[-1]), np.arange(scores.shape[-2]))
        cells = np.vstack((shift_x.ravel(), shift_y.ravel())).T * self._feat_stride
        proposals = np.hstack((cells, cells + 2 * self._feat_stride - 1)).astype(np.float64)
        proposals = np.minimum(proposals, [im_info[1] - 1, im_info[0] - 1] * 2)
        order = scores.transpose((0, 2, 3, 1)).ravel().argsort()[::-1][:post_nms_topN]
        batch_inds = np.zeros((len(order), 1), dtype=np.float32)
        blob = np.hstack((batch_inds, proposals[order, :].astype(np.float32, copy=False)))
        top[0].reshape(*(blob.shape))
        top[0].data[...] = blob

    def reshape(self, bottom, top):
        pass                                  # "Reshaping happens during the call to forward."


class RoIDataLayer(caffe.Layer):
    """One image and its RoIs per step, from the roidb the trainer hands over."""

    def set_roidb(self, roidb):
        self._roidb, self._cur = roidb, 0

    def setup(self, bottom, top):
        n = ast.literal_eval(self.param_str_)['num_classes'] * 4
        shapes = [(1, 3, 20, 20), (1, 5), (1,), (1, n), (1, n), (1, n)]
        names = ['data', 'rois', 'labels', 'bbox_targets', 'bbox_inside_weights',
                 'bbox_outside_weights']
        self._name_to_top_map = {name: i for i, name in enumerate(names)}
        for idx, shape in enumerate(shapes):
            top[idx].reshape(*shape)

    def forward(self, bottom, top):
        blobs = self._roidb[self._cur % len(self._roidb)]
        self._cur += 1
        for blob_name, blob in blobs.items():
            top_ind = self._name_to_top_map[blob_name]
            top[top_ind].reshape(*(blob.shape))
            top[top_ind].data[...] = blob.astype(np.float32, copy=False)

    def reshape(self, bottom, top):
        pass
'''


def im_detect(net, im_blob, boxes, im_scale, has_rpn):
    """lib/fast_rcnn/test.py's inputs, reshapes and forward (one scale)."""
    blobs = {"data": im_blob}
    if has_rpn:
        blobs["im_info"] = np.array([[im_blob.shape[2], im_blob.shape[3], im_scale]], dtype=np.float32)
    else:
        blobs["rois"] = np.hstack((np.zeros((len(boxes), 1)), boxes * im_scale)).astype(np.float32)
    net.blobs["data"].reshape(*(blobs["data"].shape))
    extra = "im_info" if has_rpn else "rois"
    net.blobs[extra].reshape(*(blobs[extra].shape))
    forward_kwargs = {"data": blobs["data"].astype(np.float32, copy=False)}
    forward_kwargs[extra] = blobs[extra].astype(np.float32, copy=False)
    blobs_out = net.forward(**forward_kwargs)
    if has_rpn:
        rois = net.blobs["rois"].data.copy()
        boxes = rois[:, 1:5] / im_scale               # unscale back to raw image space
    return net.blobs["cls_score"].data, blobs_out["cls_prob"], blobs_out["bbox_pred"], boxes


@pytest.mark.parametrize("has_rpn, phase, keep", [(False, caffe.TEST, 0), (True, caffe.TEST, 3),
                                                   (True, caffe.TRAIN, 5)])
def test_faster_rcnn_im_detect(tmp_path, monkeypatch, has_rpn, phase, keep):
    write(tmp_path, "rpn_layers.py", FRCNN_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = caffe.Net(write(tmp_path, "test.prototxt", frcnn_net(has_rpn)), phase)
    p, rng = params64(net), np.random.default_rng(4)
    for h, w, im_scale, r in ((16, 16, 1.0, 4), (12, 22, 0.5, 7)):
        im_blob = rng.normal(size=(1, 3, h, w))        # unsaturated: no tied RPN scores
        boxes = random_rois(rng, h / im_scale, w / im_scale, r)[:, 1:]
        cls_score, cls_prob, deltas, boxes = im_detect(net, im_blob, boxes, im_scale, has_rpn)
        rois = np.hstack((np.zeros((len(boxes), 1)), boxes * im_scale))
        if has_rpn:
            fg = softmax(conv(im_blob, p("rpn_cls_score"), p("rpn_cls_score", 1), stride=2))[0, 1]
            ys, xs = np.unravel_index(np.argsort(fg.ravel())[::-1][:keep], fg.shape)
            want = np.minimum(np.stack([xs, ys, xs, ys], 1) * 2 + [0, 0, 3, 3], [w - 1, h - 1] * 2)
            np.testing.assert_array_equal(rois[:, 1:], want)
        score, want_deltas = frcnn_reference(p, im_blob, rois)
        assert cls_prob.shape == (keep or r, 3)
        np.testing.assert_allclose(cls_score, score, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(cls_prob, softmax(score), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(deltas, want_deltas, rtol=1e-4, atol=1e-4)


def test_faster_rcnn_training_with_roi_data_layer_and_snapshot(tmp_path, monkeypatch):
    import google.protobuf as pb2
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "roi_data_layer.py", FRCNN_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path, "train.prototxt", layer(
        "input-data", "Python", "", "data rois labels bbox_targets bbox_inside_weights "
        "bbox_outside_weights", "python_param { module: 'roi_data_layer' layer: 'RoIDataLayer' "
        "param_str: \"{'num_classes': 3}\" }") + frcnn_head()
        + layer("loss_cls", "SoftmaxWithLoss", "cls_score labels", "loss_cls")
        + layer("loss_bbox", "SmoothL1Loss", "bbox_pred bbox_targets bbox_inside_weights "
                "bbox_outside_weights", "loss_bbox"))
    solver_prototxt = write(tmp_path, "solver.prototxt", 'train_net: "train.prototxt" base_lr: 0.001 '
                            'lr_policy: "fixed" momentum: 0.9 display: 20 snapshot: 0 snapshot_prefix: "frcnn"')
    rng, roidb = np.random.default_rng(5), []
    for (h, w), r in (((20, 24), 5), ((16, 20), 3)):
        labels = rng.integers(0, 3, r).astype(np.float64)
        weights = (np.arange(12)[None] // 4 == labels[:, None]) * (labels[:, None] > 0) * 1.0
        roidb.append({"data": rng.normal(size=(1, 3, h, w)), "labels": labels, "rois": random_rois(rng, h, w, r),
                      "bbox_targets": rng.normal(size=(r, 12)) * weights,
                      "bbox_inside_weights": weights, "bbox_outside_weights": weights})
    solver = caffe.SGDSolver(solver_prototxt)
    solver_param = caffe_pb2.SolverParameter()
    with open(solver_prototxt, "rt") as f:
        pb2.text_format.Merge(f.read(), solver_param)
    solver.net.layers[0].set_roidb(roidb)
    while solver.iter < 3:
        solver.step(1)
        net, blob = solver.net, roidb[(solver.iter - 1) % 2]
        assert net.blobs["labels"].data.shape == blob["labels"].shape
        prob = softmax(net.blobs["cls_score"].data.astype(np.float64))
        want = -np.log(prob[np.arange(len(prob)), blob["labels"].astype(int)]).mean()
        assert net.blobs["loss_cls"].data == pytest.approx(want, rel=1e-5)
        d = (net.blobs["bbox_pred"].data - blob["bbox_targets"]) * blob["bbox_inside_weights"]
        l1 = np.where(abs(d) < 1, 0.5 * d * d, abs(d) - 0.5) * blob["bbox_outside_weights"]
        assert net.blobs["loss_bbox"].data == pytest.approx(l1.sum() / len(d), rel=1e-5)
    # SolverWrapper.snapshot: unnormalize bbox_pred, save, restore
    stds, means = rng.uniform(0.1, 0.3, 12), rng.normal(size=12) * 0.1
    orig_0 = net.params["bbox_pred"][0].data.copy()
    orig_1 = net.params["bbox_pred"][1].data.copy()
    net.params["bbox_pred"][0].data[...] = net.params["bbox_pred"][0].data * stds[:, np.newaxis]
    net.params["bbox_pred"][1].data[...] = net.params["bbox_pred"][1].data * stds + means
    net.save(str(solver_param.snapshot_prefix + "_iter_{:d}".format(solver.iter) + ".caffemodel"))
    net.params["bbox_pred"][0].data[...] = orig_0
    net.params["bbox_pred"][1].data[...] = orig_1
    test = caffe.Net(write(tmp_path, "test.prototxt", 'input: "data" input_shape { dim: 1 dim: 3 '
                           'dim: 9 dim: 9 }\ninput: "rois" input_shape { dim: 1 dim: 5 }\n'
                           + frcnn_head()), "frcnn_iter_3.caffemodel", caffe.TEST)
    np.testing.assert_allclose(test.params["bbox_pred"][0].data, orig_0 * stds[:, None], rtol=1e-6)
    np.testing.assert_allclose(test.params["bbox_pred"][1].data, orig_1 * stds + means, rtol=1e-6)
    np.testing.assert_array_equal(net.params["cls_score"][0].data, test.params["cls_score"][0].data)
    solver.step(1)                                  # trains on from the restored weights
    assert np.abs(net.params["bbox_pred"][0].data - orig_0).max() < 0.05


# -- SSD's ssd_detect.py: Transformer, LabelMap, forward()['detection_out'] ---------------
def test_ssd_detect_flow(tmp_path):
    const = 'kernel_size: 1 weight_filler { type: "constant" } bias_filler { type: "constant" }'
    text = ('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
            + layer("pool", "Pooling", "data", "pool", "pooling_param { pool: AVE global_pooling: true }")
            + layer("loc", "Convolution", "pool", "loc", f"convolution_param {{ num_output: 4 {const} }}")
            + layer("conf", "Convolution", "pool", "conf", f"convolution_param {{ num_output: 3 {const} }}")
            + layer("priorbox", "PriorBox", "pool data", "priorbox", "prior_box_param { min_size: 4 "
                    "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }")
            + layer("loc_flat", "Flatten", "loc", "loc_flat") + layer("conf_flat", "Flatten", "conf", "conf_flat")
            + layer("conf_prob", "Softmax", "conf_flat", "conf_prob")
            + layer("detection_out", "DetectionOutput", "loc_flat conf_prob priorbox", "detection_out",
                    "detection_output_param { num_classes: 3 share_location: true background_label_id: 0 "
                    "nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE keep_top_k: 200 "
                    "confidence_threshold: 0.01 }"))
    net = caffe.Net(write(tmp_path, "deploy.prototxt", text), caffe.TEST)
    net.params["conf"][1].data[...] = [0, 2, 1]          # background, aeroplane, pottedplant
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", np.array([104, 117, 123]))
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    labelmap = caffe_pb2.LabelMap()
    text_format.Merge('item { name: "none_of_the_above" label: 0 display_name: "background" } '
                      'item { name: "aeroplane" label: 1 display_name: "aeroplane" } '
                      'item { name: "pottedplant" label: 2 display_name: "pottedplant" }', labelmap)
    rgb = np.random.default_rng(6).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    net.blobs["data"].reshape(1, 3, 8, 8)
    image = caffe.io.load_image(str(tmp_path / "image.png"))
    net.blobs["data"].data[...] = transformer.preprocess("data", image)
    np.testing.assert_allclose(net.blobs["data"].data[0], rgb[:, :, ::-1].transpose(2, 0, 1)
                               - np.array([104, 117, 123])[:, None, None], atol=1e-3)
    detections = net.forward()["detection_out"]
    det_label, det_conf = detections[0, 0, :, 1], detections[0, 0, :, 2]
    top_indices = [i for i, conf in enumerate(det_conf) if conf >= 0.5]
    names = [[item.display_name for item in labelmap.item if item.label == label][0]
             for label in det_label[top_indices].tolist()]
    prob = softmax(np.array([[0.0, 2.0, 1.0]]))[0]
    assert names == ["aeroplane"] and det_label.tolist() == [1, 2]
    np.testing.assert_allclose(det_conf, prob[1:], rtol=1e-6)
    box = detections[0, 0, 0, 3:7]         # the one prior, 4 px wide at the 8 px image's centre
    np.testing.assert_allclose(box, [0.25, 0.25, 0.75, 0.75], atol=1e-6)
    assert int(round(box[0] * image.shape[1])) == 2
