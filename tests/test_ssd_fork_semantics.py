"""DetectionOutput and PriorBox against details of weiliu89/caffe branch ``ssd`` that the
random-input reference test cannot see: the float rounding of the decoded boxes (checked bit
for bit against the real Caffe golden), NMS on boxes whose overlap is NaN, and which PriorBox
parameters the fork accepts or refuses."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.engine.layers import ssd_detection
from caffe_compat.engine.layers.base import LayerError
from caffe_compat.engine.layers.ssd import PriorBox
from caffe_compat.engine.layers.ssd_detection import CENTER_SIZE, DetectionOutput, decode_boxes
from caffe_compat.proto import caffe_pb2

F32 = np.float32
GOLDEN = Path(__file__).parent / "goldens" / "layers" / "ssd_detection_output"
BOX = [0.125, 0.125, 0.375, 0.375]          # the priors of the NMS cases, exact in float
NAN_ROW = [np.nan] * 4


def _layer_param(text: str) -> caffe_pb2.LayerParameter:
    param = caffe_pb2.LayerParameter()
    text_format.Parse(text, param)
    return param


def detection_output(params: str, shapes) -> DetectionOutput:
    return DetectionOutput(_layer_param(f'name: "det" type: "DetectionOutput" '
                                        f'detection_output_param {{ {params} }}'),
                           shapes, caffe_pb2.TEST)


def prior_box(params: str, feat=(1, 1, 1, 1), image=(1, 1, 10, 10)) -> PriorBox:
    return PriorBox(_layer_param(f'name: "p" type: "PriorBox" prior_box_param {{ {params} }}'),
                    [feat, image], caffe_pb2.TEST)


def forward(params: str, loc, conf, prior) -> np.ndarray:
    """The ``[D, 7]`` rows of a DetectionOutput with these parameters (NaN and overflow
    warnings of the inputs silenced)."""
    layer = detection_output(params, [loc.shape, conf.shape, prior.shape])
    with np.errstate(over="ignore", invalid="ignore"):
        return layer.forward(*map(torch.from_numpy, (loc, conf, prior))).numpy()[0, 0]


def test_detection_rows_equal_caffe_bit_for_bit_given_its_inputs():
    """Caffe's own loc, conf and prior blobs in, its ``det`` rows out, every bit: the box
    corners depend on the float exp of the size offsets (libm's, correctly rounded)."""
    golden = np.load(GOLDEN / "golden.npz")
    net = caffe_pb2.NetParameter()
    text_format.Parse((GOLDEN / "net.prototxt").read_text(), net)
    param = next(layer for layer in net.layer if layer.type == "DetectionOutput")
    loc, conf, prior = (golden[f"blob/{name}"] for name in param.bottom)
    layer = DetectionOutput(param, [loc.shape, conf.shape, prior.shape], caffe_pb2.TEST)
    got = layer.forward(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior))
    np.testing.assert_array_equal(got.numpy(), golden["blob/det"])


def test_center_size_widths_use_the_correctly_rounded_float_exp():
    """SSD: ``width = exp(v * t) * prior_width`` with ``exp`` of a float, i.e. the float
    nearest the true exponential; float64 reference, one size offset per value."""
    offsets = np.linspace(-4, 4, 2001, dtype=F32)
    priors = np.tile(np.array([0.2, 0.3, 0.45, 0.7], F32), (len(offsets), 1))
    variances = np.tile(np.array([0.1, 0.1, 0.2, 0.2], F32), (len(offsets), 1))
    loc = np.zeros((len(offsets), 4), F32)
    loc[:, 2] = offsets
    boxes = decode_boxes(loc, priors, variances, CENTER_SIZE, False)
    width = F32(F32(0.45) - F32(0.2))
    centre = float(F32(F32(F32(0.2) + F32(0.45)) / F32(2)))
    expected = []
    for t in offsets:
        w = F32(F32(math.exp(float(F32(F32(0.2) * t)))) * width)
        expected.append(F32(centre - float(w) / 2.0))
    np.testing.assert_array_equal(boxes[:, 0], np.asarray(expected, F32))


def _overflow_case():
    """Three identical priors; box 0's width overflows to inf (xmin -inf, xmax inf), box 1's
    too, box 2 is the prior itself. Scores 0.9 > 0.8 > 0.7 for class 1."""
    priors = np.tile(np.array([0.125, 0.125, 0.375, 0.375], F32), (3, 1))
    prior = np.stack([priors.reshape(-1), np.full(12, 0.1, F32)])[None]
    loc = np.zeros((1, 12), F32)
    loc[0, 2] = loc[0, 6] = 1000.0      # exp(100) overflows float32
    conf = np.array([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7]], F32)
    return loc, conf, prior


@pytest.mark.parametrize("matrix_limit", [ssd_detection.MATRIX_LIMIT, 1])
@pytest.mark.parametrize("eta", [1.0, 0.9])
def test_nms_suppresses_a_box_whose_overlap_is_nan(matrix_limit, eta, monkeypatch):
    """Two boxes infinite in x: intersection inf, union inf + inf - inf = NaN. SSD keeps a box
    only when ``overlap <= threshold``, false for NaN, so box 1 goes; box 2 overlaps box 0 by
    ``0.0625 / inf = 0`` and stays."""
    monkeypatch.setattr(ssd_detection, "MATRIX_LIMIT", matrix_limit)
    loc, conf, prior = _overflow_case()
    out = forward("num_classes: 2 background_label_id: 0 code_type: CENTER_SIZE "
                  f"nms_param {{ nms_threshold: 0.45 eta: {eta} }}", loc, conf, prior)
    inf = np.inf
    np.testing.assert_array_equal(out, np.array([
        [0, 1, F32(0.9), -inf, 0.125, inf, 0.375], [0, 1, F32(0.7), *BOX]], F32))


@pytest.mark.parametrize("matrix_limit", [ssd_detection.MATRIX_LIMIT, 1])
@pytest.mark.parametrize("nan_prior,rows", [
    (1, [[0, 1, F32(0.9), *BOX], [0, 1, F32(0.8), *NAN_ROW]]),
    (0, [[0, 1, F32(0.9), *NAN_ROW]])])
def test_nms_of_a_nan_box_follows_ssds_argument_order(nan_prior, rows, matrix_limit,
                                                      monkeypatch):
    """SSD's overlap of a candidate with a kept box is not symmetric with NaN corners:
    ``std::max``/``std::min`` return their first argument, the candidate's, when a comparison
    with NaN fails. A NaN candidate: intersection width NaN, overlap 0, kept (and the copy of
    box 0 after it is still suppressed by box 0). A NaN kept box: the intersection is the
    candidate itself, the union (with the NaN size) NaN, so every later box goes."""
    monkeypatch.setattr(ssd_detection, "MATRIX_LIMIT", matrix_limit)
    loc, conf, prior = _overflow_case()
    loc[:] = 0
    loc[0, 4 * nan_prior:4 * nan_prior + 4] = np.nan
    out = forward("num_classes: 2 background_label_id: 0 code_type: CENTER_SIZE "
                  "nms_param { nms_threshold: 0.45 }", loc, conf, prior)
    np.testing.assert_array_equal(out, np.array(rows, F32))


def test_background_minus_one_scores_every_class():
    """background_label_id -1: no class is skipped (SSD's GPU forward; its CPU forward aborts
    when locations are shared, finding no decoded boxes under label -1)."""
    loc, conf, prior = _overflow_case()
    loc[:] = 0
    out = forward("num_classes: 2 background_label_id: -1 code_type: CENTER_SIZE "
                  "nms_param { nms_threshold: 0.45 }", loc, conf, prior)
    np.testing.assert_array_equal(out, np.array([[0, 0, F32(0.3), *BOX],
                                                 [0, 1, F32(0.9), *BOX]], F32))


def test_prior_box_checks_sizes_before_truncating_them():
    """SSD checks ``min_size > 0`` and ``max_size > min_size`` on the float values and only
    then truncates each to an int: 0.5 gives a zero-size box, 5.5/5.9 two 5-pixel boxes."""
    zero = prior_box("min_size: 0.5").forward(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 10, 10))
    np.testing.assert_array_equal(zero[0, 0].numpy(), np.full(4, 0.5, F32))
    same = prior_box("min_size: 5.5 max_size: 5.9").forward(torch.zeros(1, 1, 1, 1),
                                                            torch.zeros(1, 1, 10, 10))
    np.testing.assert_array_equal(same[0, 0].numpy(), np.tile(F32([0.25, 0.25, 0.75, 0.75]), 2))
    with pytest.raises(LayerError, match="max_size"):
        prior_box("min_size: 5.5 max_size: 5.5")
    with pytest.raises(LayerError, match="min_size"):
        prior_box("min_size: 0")


@pytest.mark.parametrize("params,named", [
    ("img_w: 40", "img_h"), ("img_h: 30 img_w: 0", "img_w"), ("img_size: 0", "img_size"),
    ("step_h: 8", "step_w"), ("step: -2", "step"), ("step_h: 0 step_w: 8", "step_h"),
    ("variance: nan", "variance")])
def test_prior_box_refuses_what_ssd_refuses(params, named):
    """SSD CHECKs that an image size, step or variance it is given is positive (img_w alone
    leaves img_h at 0): one clear error instead of silently using the bottom's size."""
    with pytest.raises(LayerError, match=named):
        prior_box(f"min_size: 4 {params}")


def test_keep_top_k_orders_tied_scores_as_libstdcxx_std_sort():
    """SSD cuts to keep_top_k with ``std::sort`` on the score alone, not stable. Twelve
    disjoint boxes; class 1 scores 0.75 at priors 1 4 6 9, class 2 at 0 3 5 8 11, 0.5
    elsewhere: 24 pairs, class 1's in NMS order then class 2's, keys 4×0.75 8×0.5 5×0.75
    7×0.5. g++'s std::sort orders them 1 16 15 14 13 12 3 2 0 23 …; the first ten are pairs
    of class 1 at priors 4 9 6 1 and of class 2 at priors 11 8 5 3 0 and 10 (a 0.5 from class
    2, where a stable sort would keep class 1's prior 0 and index order within each class)."""
    grid = [(j % 4 * 0.25, j // 4 * 0.25) for j in range(12)]
    priors = np.array([[x, y, x + 0.125, y + 0.125] for x, y in grid], F32)
    prior = np.stack([priors.reshape(-1), np.full(48, 0.1, F32)])[None]
    high = {1: [1, 4, 6, 9], 2: [0, 3, 5, 8, 11]}
    conf = np.full((12, 3), 0.5, F32)
    conf[:, 0] = 0.1
    for label, ones in high.items():
        conf[ones, label] = 0.75
    out = forward("num_classes: 3 background_label_id: 0 code_type: CENTER_SIZE "
                  "nms_param { nms_threshold: 0.45 } keep_top_k: 10",
                  np.zeros((1, 48), F32), conf.reshape(1, -1), prior)
    kept = [(1, p, 0.75) for p in (4, 9, 6, 1)] + [(2, p, 0.75) for p in (11, 8, 5, 3, 0)]
    np.testing.assert_array_equal(out, np.array(
        [[0, label, score, *priors[p]] for label, p, score in kept + [(2, 10, 0.5)]], F32))


def test_prior_box_aspect_ratio_zero_gives_infinite_boxes_as_ssd():
    """SSD stores ``1./ar`` (inf for 0) and divides by ``sqrt(ar)``: a 0-wide infinitely tall
    box and its flip, not an error."""
    out = prior_box("min_size: 4 aspect_ratio: 0").forward(torch.zeros(1, 1, 1, 1),
                                                           torch.zeros(1, 1, 10, 10))
    inf = np.inf
    np.testing.assert_array_equal(out[0, 0].numpy(), np.array(
        [0.3, 0.3, 0.7, 0.7, 0.5, -inf, 0.5, inf, -inf, 0.5, inf, 0.5], F32))


@pytest.mark.parametrize("code_type", ["CENTER_SIZE", "CORNER_SIZE", "CORNER"])
def test_zero_width_priors_decode_as_ssds_gpu_forward(code_type):
    """SSD's CPU DecodeBBox CHECKs prior width > 0 for the size-relative codes; its GPU kernel
    (and OpenCV) decode such a prior with the same formulas: a zero-width box, here kept."""
    loc, conf, prior = _overflow_case()
    loc[:] = 0
    prior[0, 0, 6] = prior[0, 0, 4]            # prior 1: xmax = xmin
    out = forward("num_classes: 2 background_label_id: 0 nms_param { nms_threshold: 0.45 } "
                  f"code_type: {code_type}", loc, conf, prior)
    np.testing.assert_array_equal(out, np.array([[0, 1, F32(0.9), *BOX],
                                                 [0, 1, F32(0.8), 0.125, 0.125, 0.125, 0.375]],
                                                F32))


@pytest.mark.parametrize("nms,named", [("nms_threshold: -0.1", "nms_threshold"),
                                       ("nms_threshold: nan", "nms_threshold"),
                                       ("eta: 0", "eta"), ("eta: 1.5", "eta"), ("eta: nan", "eta")])
def test_detection_output_refuses_what_ssd_refuses(nms, named):
    """SSD CHECKs nms_threshold >= 0 and 0 < eta <= 1 (NaN fails both)."""
    with pytest.raises(LayerError, match=named):
        detection_output(f"num_classes: 2 nms_param {{ {nms} }}", [(1, 4), (1, 2), (1, 2, 4)])


def reference_decode(prior, var, loc, code: str, in_target: bool) -> list:
    """SSD's DecodeBBox for one box, one C operation at a time: float operands give a float
    (rounded here with F32), ``/ 2.`` and the final corners go through double."""
    f = F32
    if in_target:
        var = [f(1)] * 4                       # SSD's branch skips the multiplication
    if code == "CORNER":
        return [f(prior[i] + f(var[i] * loc[i])) for i in range(4)]
    pw, ph = f(prior[2] - prior[0]), f(prior[3] - prior[1])
    if code == "CORNER_SIZE":
        size = [pw, ph, pw, ph]
        return [f(prior[i] + f(f(var[i] * loc[i]) * size[i])) for i in range(4)]
    cx = f(f(f(var[0] * loc[0]) * pw) + f(float(f(prior[0] + prior[2])) / 2.0))
    cy = f(f(f(var[1] * loc[1]) * ph) + f(float(f(prior[1] + prior[3])) / 2.0))
    w = f(f(math.exp(float(f(var[2] * loc[2])))) * pw)
    h = f(f(math.exp(float(f(var[3] * loc[3])))) * ph)
    return [f(float(cx) - float(w) / 2.0), f(float(cy) - float(h) / 2.0),
            f(float(cx) + float(w) / 2.0), f(float(cy) + float(h) / 2.0)]


@pytest.mark.parametrize("in_target", [False, True])
@pytest.mark.parametrize("code", ["CORNER", "CENTER_SIZE", "CORNER_SIZE"])
def test_decode_equals_ssds_decode_bbox_bit_for_bit(code, in_target):
    rng = np.random.default_rng(5)
    centres, sizes = rng.uniform(0.1, 0.9, (300, 2)), rng.uniform(0.01, 0.5, (300, 2))
    priors = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(F32)
    variances = rng.uniform(0.05, 0.3, (300, 4)).astype(F32)
    loc = rng.normal(0, 2, (300, 4)).astype(F32)
    got = decode_boxes(loc, priors, variances, caffe_pb2.PriorBoxParameter.CodeType.Value(code),
                       in_target)
    want = [reference_decode(*rows, code, in_target) for rows in zip(priors, variances, loc)]
    np.testing.assert_array_equal(got, np.asarray(want, F32))


@pytest.mark.parametrize("threshold,keep_top_k", [(0.95, -1), (0.0, 0)])
def test_no_detection_in_any_image_gives_one_minus_one_row_per_image(threshold, keep_top_k):
    """SSD: ``num_kept == 0`` (nothing above the threshold, or keep_top_k 0) → top
    ``[1, 1, num, 7]`` filled with -1, column 0 the image id."""
    loc, conf, prior = _overflow_case()
    loc, conf = np.zeros((2, 12), F32), np.tile(conf, (2, 1))
    out = forward(f"num_classes: 2 code_type: CENTER_SIZE confidence_threshold: {threshold} "
                  f"keep_top_k: {keep_top_k}", loc, conf, prior)
    np.testing.assert_array_equal(out, np.array([[0] + [-1] * 6, [1] + [-1] * 6], F32))


def test_an_image_without_detections_gets_no_row_when_another_has_some():
    loc, conf, prior = _overflow_case()
    loc, conf = np.zeros((2, 12), F32), np.tile(conf, (2, 1))
    conf[0, 1::2] = 0.05                       # image 0: class 1 below the threshold
    out = forward("num_classes: 2 code_type: CENTER_SIZE confidence_threshold: 0.5", loc, conf,
                  prior)
    np.testing.assert_array_equal(out, np.array([[1, 1, F32(0.9), *BOX]], F32))
