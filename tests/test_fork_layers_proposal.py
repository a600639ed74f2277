"""Faster R-CNN's C++ ``Proposal`` layer against OpenCV DNN's (cv2.dnn.readNetFromCaffe on the
same prototxt), against a float64 numpy re-statement of rbgirshick/py-faster-rcnn's
lib/rpn/proposal_layer.py + generate_anchors.py, its parameter and shape errors, and a tiny
faster_rcnn_zf-style deploy net built from its prototxt here and in OpenCV."""
import cv2
import numpy as np
import pytest
import torch

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


SHAPES = [(1, 18, 2, 3), (1, 36, 2, 3), (1, 3)]


@pytest.mark.parametrize("param, shapes, message", [
    ("feat_stride: 0", SHAPES, "feat_stride and base_size must be > 0"),
    ("ratio: 0 ratio: 1 ratio: 2", SHAPES, "ratio and scale values must be > 0"),
    ("nms_thresh: 1.5", SHAPES, "nms_thresh must be in [0, 1]"),
    ("", [(1, 9, 2, 3)] + SHAPES[1:], "bottom 0 (scores) must be [N, 2·A = 18, H, W]"),
    ("ratio: 1", SHAPES, "bottom 0 (scores) must be [N, 2·A = 6, H, W] for the 3 anchors"),
    ("", [SHAPES[0], (1, 36, 3, 2), SHAPES[2]], "bottom 1 (deltas) must be [N, 4·A, H, W] = [1, 36, 2, 3]"),
    ("", SHAPES[:2] + [(1, 2)], "bottom 2 (im_info) must be [N = 1, 3]"),
])
def test_bad_params_and_shapes_name_the_layer(param, shapes, message):
    with pytest.raises(LayerError) as info:
        make_layer(f'name: "prop" type: "Proposal" top: "rois" proposal_param {{ {param} }}', shapes)
    assert "layer 'prop' (Proposal)" in str(info.value) and message in str(info.value)


def test_bottom_count_is_checked(tmp_path):
    text = ('input: "cls" input_shape { dim: 1 dim: 18 dim: 2 dim: 3 }\n'
            'input: "bbox" input_shape { dim: 1 dim: 36 dim: 2 dim: 3 }\n'
            + layer("prop", "Proposal", "cls bbox", "rois"))
    with pytest.raises(Exception, match="prop"):
        caffe.Net(write(tmp_path, "bad.prototxt", text), caffe.TEST)


def test_no_surviving_box_gives_zero_rows():
    prob, deltas = peaked_inputs(7, a=9, h=2, w=3)
    lay = make_layer('name: "p" type: "Proposal" top: "rois" top: "s" proposal_param { min_size: 16 }',
                     [prob.shape, deltas.shape, (1, 3)])
    rois, scores = lay(torch.from_numpy(prob), torch.from_numpy(deltas),
                       torch.tensor([[10.0, 10.0, 1.0]]))     # a 10 x 10 image: no 16-pixel box
    assert rois.shape == (0, 5) and scores.shape == (0, 1)


def test_batch_images_are_proposed_alone_with_their_index():
    (p0, d0), (p1, d1) = peaked_inputs(8), peaked_inputs(9)
    info = np.array([[96, 128, 1.0], [64, 80, 0.5]], np.float32)
    lay = make_layer('name: "p" type: "Proposal" top: "rois" proposal_param { post_nms_topn: 7 }',
                     [(2, 18, 6, 8), (2, 36, 6, 8), (2, 3)])
    rois = lay(*(torch.from_numpy(np.concatenate(x)) for x in ((p0, p1), (d0, d1))),
               torch.from_numpy(info)).numpy()
    for i, (p, d) in enumerate(((p0, d0), (p1, d1))):
        ref, _ = py_proposals(p, d, info[i].astype(np.float64), post=7, nms=np.float32(0.7))
        np.testing.assert_array_equal(rois[rois[:, 0] == i, 1:], ref.astype(np.float32))


def tiny_faster_rcnn(min_size):
    """faster_rcnn_models' ZF test.prototxt in miniature: conv trunk, rpn_conv/3x3, the
    rpn_cls_score -> Reshape -> Softmax -> Reshape chain, the C++ Proposal (as OpenCV's
    sample prototxt uses it), ROIPooling, fc and the cls_prob / bbox_pred heads."""
    params = (f"feat_stride: 4 base_size: 4 min_size: {min_size} ratio: 0.5 ratio: 1 ratio: 2 "
              "scale: 1 scale: 2 pre_nms_topn: 60 post_nms_topn: 12 nms_thresh: 0.7")
    return ('input: "data" input_shape { dim: 1 dim: 3 dim: 32 dim: 40 }\n'
            'input: "im_info" input_shape { dim: 1 dim: 3 }\n'
            + layer("conv1", "Convolution", "data", "conv1", cv(8, 4, "stride: 4"))
            + layer("relu1", "ReLU", "conv1", "conv1")
            + layer("rpn_conv/3x3", "Convolution", "conv1", "rpn/output", cv(8, 3, "pad: 1"))
            + layer("rpn_relu/3x3", "ReLU", "rpn/output", "rpn/output")
            + layer("rpn_cls_score", "Convolution", "rpn/output", "rpn_cls_score", cv(12, 1))
            + layer("rpn_bbox_pred", "Convolution", "rpn/output", "rpn_bbox_pred", cv(24, 1))
            + layer("rpn_cls_score_reshape", "Reshape", "rpn_cls_score", "rpn_cls_score_reshape", RESHAPE)
            + layer("rpn_cls_prob", "Softmax", "rpn_cls_score_reshape", "rpn_cls_prob")
            + layer("rpn_cls_prob_reshape", "Reshape", "rpn_cls_prob", "rpn_cls_prob_reshape",
                    "reshape_param { shape { dim: 0 dim: 12 dim: -1 dim: 0 } }")
            + layer("proposal", "Proposal", "rpn_cls_prob_reshape rpn_bbox_pred im_info", "rois",
                    f"proposal_param {{ {params} }}")
            + layer("roi_pool5", "ROIPooling", "conv1 rois", "pool5",
                    "roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.25 }")
            + layer("fc6", "InnerProduct", "pool5", "fc6", ip(16))
            + layer("relu6", "ReLU", "fc6", "fc6")
            + layer("cls_score", "InnerProduct", "fc6", "cls_score", ip(3))
            + layer("bbox_pred", "InnerProduct", "fc6", "bbox_pred", ip(12))
            + layer("cls_prob", "Softmax", "cls_score", "cls_prob"))


@pytest.mark.parametrize("min_size", [0, 4])
def test_tiny_faster_rcnn_deploy_net_builds_and_matches_opencv(tmp_path, min_size):
    path = write(tmp_path, "deploy.prototxt", tiny_faster_rcnn(min_size))
    net = caffe.Net(path, caffe.TEST)
    rng = np.random.default_rng(10)
    data = rng.standard_normal((1, 3, 32, 40)).astype(np.float32)
    info = np.array([[32, 40, 1.0]], np.float32)
    net.blobs["data"].data[...] = data
    net.blobs["im_info"].data[...] = info
    out = net.forward()
    rois = net.blobs["rois"].data
    assert 1 < len(rois) <= 12 and out["cls_prob"].shape == (len(rois), 3)
    assert out["bbox_pred"].shape == (len(rois), 12)
    ref, _ = py_proposals(net.blobs["rpn_cls_prob_reshape"].data, net.blobs["rpn_bbox_pred"].data,
                          info[0].astype(np.float64), stride=4, base=4, scales=(1, 2), pre=60,
                          post=12, min_size=min_size, nms=np.float32(0.7))
    np.testing.assert_array_equal(rois[:, 1:], ref.astype(np.float32))
    if min_size:
        return          # OpenCV's Proposal ignores min_size (test above)
    weights = str(tmp_path / "deploy.caffemodel")
    net.save(weights)
    ocv = cv2.dnn.readNetFromCaffe(path, weights)
    ocv.setInput(data, "data")
    ocv.setInput(info, "im_info")
    cv_rois, cv_prob = ocv.forward(["proposal", "cls_prob"])
    np.testing.assert_allclose(rois, cv_rois[:len(rois)], atol=1e-3)
    np.testing.assert_allclose(out["cls_prob"], cv_prob[:len(rois)], atol=1e-5)
