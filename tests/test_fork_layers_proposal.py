"""Faster R-CNN's C++ ``Proposal`` layer against OpenCV DNN's (cv2.dnn.readNetFromCaffe on the
same prototxt), against a float64 numpy re-statement of rbgirshick/py-faster-rcnn's
lib/rpn/proposal_layer.py + generate_anchors.py, its parameter and shape errors, and a tiny
faster_rcnn_zf-style deploy net built from its prototxt here and in OpenCV."""
import cv2
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from detect_reference import RESHAPE, cv, ip, layer, write
from layer_utils import make_layer


def py_anchors(base, ratios, scales):
    """generate_anchors.py: _ratio_enum then _scale_enum, as [x1, y1, x2, y2] rows."""
    out = []
    ctr = 0.5 * (base - 1)
    for r in ratios:
        ws = np.round(np.sqrt(base * base / r))
        hs = np.round(ws * r)
        for s in scales:
            w, h = ws * s, hs * s
            out.append([ctr - 0.5 * (w - 1), ctr - 0.5 * (h - 1), ctr + 0.5 * (w - 1), ctr + 0.5 * (h - 1)])
    return np.array(out)


def py_nms(dets, thresh):
    """py-faster-rcnn's py_cpu_nms on best-first rows."""
    x1, y1, x2, y2 = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = np.arange(len(dets)), []
    while order.size:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        ovr = w * h / (areas[i] + areas[order[1:]] - w * h)
        order = order[1:][ovr <= thresh]
    return keep


def py_proposals(prob, deltas, im_info, stride=16, base=16, ratios=(0.5, 1, 2),
                 scales=(8, 16, 32), pre=6000, post=300, nms=0.7, min_size=16):
    """proposal_layer.py's forward for one image, in float64: (rois [R, 4], scores [R])."""
    anchors = py_anchors(base, ratios, scales)
    a = len(anchors)
    scores = prob[0, a:].astype(np.float64)
    h, w = scores.shape[1:]
    sx, sy = np.meshgrid(np.arange(w) * stride, np.arange(h) * stride)
    shifts = np.vstack((sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel())).T
    anchors = (anchors[None] + shifts[:, None]).reshape(-1, 4)
    d = deltas[0].astype(np.float64).transpose(1, 2, 0).reshape(-1, 4)
    scores = scores.transpose(1, 2, 0).reshape(-1)
    widths, heights = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    cx, cy = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    pcx, pcy = d[:, 0] * widths + cx, d[:, 1] * heights + cy
    pw, ph = np.exp(d[:, 2]) * widths, np.exp(d[:, 3]) * heights
    boxes = np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], 1)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, im_info[1] - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, im_info[0] - 1)
    least = min_size * im_info[2]
    keep = np.where((boxes[:, 2] - boxes[:, 0] + 1 >= least) & (boxes[:, 3] - boxes[:, 1] + 1 >= least))[0]
    boxes, scores = boxes[keep], scores[keep]
    order = scores.argsort()[::-1]
    if pre > 0:
        order = order[:pre]
    boxes, scores = boxes[order], scores[order]
    keep = py_nms(boxes, nms)
    if post > 0:
        keep = keep[:post]
    return boxes[keep], scores[keep]


def peaked_inputs(seed, a=9, h=6, w=8, spread=0.2):
    """Distinct scores with a few strong peaks, small deltas (some big enough to clip)."""
    rng = np.random.default_rng(seed)
    prob = rng.permutation(2 * a * h * w).reshape(1, 2 * a, h, w) / (2.0 * a * h * w)
    prob[0, a + rng.integers(0, a, 4), rng.integers(0, h, 4), rng.integers(0, w, 4)] += 1.0
    deltas = rng.standard_normal((1, 4 * a, h, w)) * spread
    return prob.astype(np.float32), deltas.astype(np.float32)


def proposal_net(a, h, w, params):
    return (f'input: "cls" input_shape {{ dim: 1 dim: {2 * a} dim: {h} dim: {w} }}\n'
            f'input: "bbox" input_shape {{ dim: 1 dim: {4 * a} dim: {h} dim: {w} }}\n'
            'input: "im_info" input_shape { dim: 1 dim: 3 }\n'
            + layer("proposal", "Proposal", "cls bbox im_info", "rois scores",
                    f"proposal_param {{ {params} }}")
            # a consumer, so OpenCV hands out the second top (the scores)
            + layer("score_copy", "Power", "scores", "score_copy"))


ZF_PARAMS = ("feat_stride: 16 base_size: 16 min_size: 0 ratio: 0.5 ratio: 1 ratio: 2 "
             "scale: 8 scale: 16 scale: 32 pre_nms_topn: 120 post_nms_topn: 25 nms_thresh: 0.6")


def run_ours(path, feeds):
    net = caffe.Net(path, caffe.TEST)
    for name, value in feeds.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    return net.blobs["rois"].data.copy(), net.blobs["scores"].data.copy()


def run_opencv(path, feeds, outputs=("proposal", "score_copy")):
    net = cv2.dnn.readNetFromCaffe(path)
    for name, value in feeds.items():
        net.setInput(value, name)
    return net.forward(list(outputs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rois_and_scores_match_opencv_dnn(tmp_path, seed):
    prob, deltas = peaked_inputs(seed)
    info = np.array([[96, 128, 1.0]], np.float32)
    path = write(tmp_path, "p.prototxt", proposal_net(9, 6, 8, ZF_PARAMS))
    feeds = {"cls": prob, "bbox": deltas, "im_info": info}
    rois, scores = run_ours(path, feeds)
    cv_rois, cv_scores = run_opencv(path, feeds)
    r = len(rois)
    assert 0 < r <= 25 and cv_rois.shape == (25, 5)
    # OpenCV pads its fixed post_nms_topn rows with zeros; ours has R rows (py-faster-rcnn)
    np.testing.assert_allclose(rois, cv_rois[:r], atol=2e-4)
    np.testing.assert_array_equal(cv_rois[r:], 0)
    np.testing.assert_array_equal(scores[:, 0], cv_scores.reshape(-1)[:r])


def test_opencv_skips_min_size_which_the_reference_applies(tmp_path):
    """OpenCV's layer leaves min_size out (its proposal_layer.cpp comments it out);
    py-faster-rcnn and the C++ forks drop boxes under min_size·im_info[2]: so does ours."""
    prob, deltas = peaked_inputs(3, spread=1.0)
    info = np.array([[96, 128, 2.0]], np.float32)
    params = ZF_PARAMS.replace("min_size: 0", "min_size: 16").replace("post_nms_topn: 25",
                                                                      "post_nms_topn: 0")
    path = write(tmp_path, "p.prototxt", proposal_net(9, 6, 8, params))
    rois, _ = run_ours(path, {"cls": prob, "bbox": deltas, "im_info": info})
    sides = rois[:, 3:5] - rois[:, 1:3] + 1
    assert len(rois) and sides.min() >= 32
    ref, _ = py_proposals(prob, deltas, info[0], pre=120, post=0, nms=np.float32(0.6), min_size=16)
    np.testing.assert_allclose(rois[:, 1:], ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("case", [
    dict(seed=4, info=(96, 128, 1.0), min_size=16, pre=6000, post=300, nms=0.7),
    dict(seed=5, info=(80, 100, 0.5), min_size=8, pre=50, post=10, nms=0.3),
    dict(seed=6, info=(96, 128, 1.6), min_size=16, pre=0, post=0, nms=0.5),
])
def test_matches_float64_py_faster_rcnn(case):
    prob, deltas = peaked_inputs(case["seed"], spread=0.5)
    info = np.array([case["info"]], np.float32)
    text = ('name: "p" type: "Proposal" top: "rois" top: "scores" proposal_param { '
            f'min_size: {case["min_size"]} pre_nms_topn: {case["pre"]} '
            f'post_nms_topn: {case["post"]} nms_thresh: {case["nms"]} }}')
    lay = make_layer(text, [prob.shape, deltas.shape, info.shape])   # default anchors
    import torch
    rois, scores = lay(torch.from_numpy(prob), torch.from_numpy(deltas), torch.from_numpy(info))
    ref, ref_scores = py_proposals(prob, deltas, info[0].astype(np.float64),
                                   min_size=case["min_size"], pre=case["pre"], post=case["post"],
                                   nms=np.float32(case["nms"]))
    assert rois.shape == (len(ref), 5) and len(ref) > 1
    np.testing.assert_array_equal(rois[:, 0].numpy(), 0)
    np.testing.assert_array_equal(rois[:, 1:].numpy(), ref.astype(np.float32))
    np.testing.assert_array_equal(scores[:, 0].numpy(), ref_scores.astype(np.float32))


def test_anchor_set_is_generate_anchors():
    """The 9 ZF/VGG16 anchors generate_anchors.py documents (its __main__ output)."""
    lay = make_layer('name: "p" type: "Proposal" top: "rois"', [(1, 18, 2, 2), (1, 36, 2, 2), (1, 3)])
    np.testing.assert_array_equal(lay.anchors, [
        [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
        [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
        [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]])
