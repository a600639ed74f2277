"""DetectionOutput's vectorised decode, top_k cut and NMS against a straightforward reading of
SSD's ``ApplyNMSFast`` / ``DetectionOutputLayer::Forward_cpu``: one candidate at a time, one
overlap at a time in float32, Python sorts. Inputs are random with many tied scores (scores
drawn from a few values), many classes, per-class and shared locations, ``eta < 1`` and
``top_k`` / ``keep_top_k`` cuts that fall inside runs of ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.engine.layers import ssd_detection
from caffe_compat.engine.layers.ssd_detection import DetectionOutput, decode_boxes
from caffe_compat.engine.layers.stl_sort import sort_descending
from caffe_compat.proto import caffe_pb2

F32 = np.float32


def reference_overlap(a: np.ndarray, b: np.ndarray) -> F32:
    """SSD's JaccardOverlap of two normalised boxes, float32 throughout."""
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return F32(0)
    iw = F32(min(a[2], b[2]) - max(a[0], b[0]))
    ih = F32(min(a[3], b[3]) - max(a[1], b[1]))
    if not (iw > 0 and ih > 0):
        return F32(0)

    def size(box):
        w, h = F32(box[2] - box[0]), F32(box[3] - box[1])
        return F32(0) if w < 0 or h < 0 else F32(w * h)
    inter = F32(iw * ih)
    return F32(inter / F32(F32(size(a) + size(b)) - inter))


def reference_nms(boxes, scores, score_threshold, nms_threshold, eta, top_k) -> list[int]:
    pairs = [(scores[i], i) for i in range(len(scores)) if scores[i] > F32(score_threshold)]
    pairs.sort(key=lambda pair: -pair[0])  # Python's sort is stable, like std::stable_sort
    if top_k > -1:
        pairs = pairs[:top_k]
    kept: list[int] = []
    threshold = F32(nms_threshold)
    for _, idx in pairs:
        if all(reference_overlap(boxes[idx], boxes[k]) <= threshold for k in kept):
            kept.append(idx)
            if eta < 1 and threshold > 0.5:
                threshold = F32(threshold * F32(eta))
    return kept


def reference_forward(layer: DetectionOutput, loc, conf, prior) -> np.ndarray:
    n, p = loc.shape[0], prior.shape[2] // 4
    loc = loc.reshape(n, p, layer.num_loc_classes, 4)
    conf = conf.reshape(n, p, layer.num_classes)
    priors, variances = prior.reshape(2, p, 4)
    rows = []
    for i in range(n):
        kept = {}
        for c in range(layer.num_classes):
            if c == layer.background:
                continue
            boxes = decode_boxes(loc[i, :, 0 if layer.share_location else c], priors,
                                 variances, layer.code_type, layer.variance_in_target)
            kept[c] = (boxes, reference_nms(boxes, conf[i, :, c], layer.confidence_threshold,
                                            layer.nms_threshold, layer.eta, layer.top_k))
        pairs = [(conf[i, k, c], c, k) for c, (_, ks) in kept.items() for k in ks]
        if -1 < layer.keep_top_k < len(pairs):
            # SSD's std::sort, whose order among ties test_stl_sort checks against libstdc++
            order = sort_descending(np.array([pair[0] for pair in pairs], F32))
            pairs = [pairs[j] for j in order[:layer.keep_top_k]]
        for c in sorted(kept):
            boxes = kept[c][0]
            rows += [[i, c, s, *boxes[k]] for s, label, k in pairs if label == c]
    if not rows:
        rows = [[i] + [-1] * 6 for i in range(n)]
    return np.asarray(rows, dtype=F32)


def make_layer(params: str, shapes) -> DetectionOutput:
    layer = caffe_pb2.LayerParameter()
    text_format.Parse(f'name: "det" type: "DetectionOutput" detection_output_param {{ {params} }}',
                      layer)
    return DetectionOutput(layer, shapes, caffe_pb2.TEST)


def random_inputs(rng, n, p, classes, loc_classes, score_levels):
    centres = rng.uniform(0.2, 0.8, (p, 2)).astype(F32)
    sizes = rng.uniform(0.05, 0.3, (p, 2)).astype(F32)
    priors = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    priors[::7] = priors[3]  # duplicated priors: exact overlaps of 1 and tied boxes
    variances = np.tile(np.array([0.1, 0.1, 0.2, 0.2], F32), (p, 1))
    prior = np.stack([priors.reshape(-1), variances.reshape(-1)])[None].astype(F32)
    loc = rng.normal(0, 1, (n, p * loc_classes * 4)).astype(F32)
    loc[:, :p * loc_classes * 4 // 3] = 0  # a third of the boxes are their priors exactly
    levels = rng.uniform(0, 1, score_levels).astype(F32)
    conf = levels[rng.integers(0, score_levels, (n, p * classes))]
    return loc, conf, prior


CASES = [
    ("num_classes: 2 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
     "nms_param { nms_threshold: 0.3 top_k: 50 } keep_top_k: 30 confidence_threshold: 0.2", 1),
    ("num_classes: 21 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
     "nms_param { nms_threshold: 0.45 top_k: 40 } keep_top_k: 25 confidence_threshold: 0.3", 1),
    ("num_classes: 12 share_location: false background_label_id: 3 code_type: CORNER "
     "nms_param { nms_threshold: 0.5 top_k: 17 eta: 0.9 } keep_top_k: 60", 12),
    ("num_classes: 9 share_location: false background_label_id: -1 code_type: CORNER_SIZE "
     "variance_encoded_in_target: true nms_param { nms_threshold: 0.6 eta: 0.7 } "
     "confidence_threshold: 0.5", 9),
    ("num_classes: 5 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
     "nms_param { nms_threshold: 0.0 top_k: 0 } keep_top_k: 5", 1),
    ("num_classes: 3 share_location: true background_label_id: 0 code_type: CENTER_SIZE "
     "nms_param { nms_threshold: 1.0 top_k: 500 } keep_top_k: -1 confidence_threshold: 0.99", 1),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("params,loc_classes", CASES)
def test_detection_output_equals_reference(params, loc_classes, seed):
    rng = np.random.default_rng(seed)
    classes = int(params.split()[1])
    loc, conf, prior = random_inputs(rng, 3, 90, classes, loc_classes, score_levels=6)
    layer = make_layer(params, [loc.shape, conf.shape, prior.shape])
    got = layer.forward(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior))
    want = reference_forward(layer, loc, conf, prior)
    assert got.shape == (1, 1, len(want), 7)
    np.testing.assert_array_equal(got.numpy()[0, 0], want)


def test_reference_case_set_exercises_ties_and_cuts():
    """The random inputs above do reach the paths under test: tied scores at the top_k cut,
    boxes struck by NMS and keep_top_k dropping detections."""
    rng = np.random.default_rng(0)
    loc, conf, prior = random_inputs(rng, 3, 90, 21, 1, score_levels=6)
    layer = make_layer(CASES[1][0], [loc.shape, conf.shape, prior.shape])
    scores = np.sort(conf.reshape(3, 90, 21)[0, :, 1])[::-1]
    assert scores[layer.top_k - 1] == scores[layer.top_k]
    out = reference_forward(layer, loc, conf, prior)
    assert (out[:, 0] == 0).sum() == layer.keep_top_k


def test_prior_box_top_is_recomputed_per_shape_and_a_written_top_does_not_stick():
    from caffe_compat.engine.layers.ssd import PriorBox
    param = caffe_pb2.LayerParameter()
    text_format.Parse('name: "p" type: "PriorBox" prior_box_param { min_size: 8 max_size: 16 '
                      'aspect_ratio: 2 flip: true variance: 0.1 variance: 0.2 variance: 0.2 '
                      'variance: 0.1 }', param)
    layer = PriorBox(param, [(1, 4, 5, 6), (1, 3, 40, 48)], caffe_pb2.TEST)
    feat, image = torch.zeros(1, 4, 5, 6), torch.zeros(1, 3, 40, 48)
    first = layer.forward(feat, image)
    np.testing.assert_array_equal(first[0].numpy(), layer._boxes((5, 6), (40, 48)))
    first.fill_(7)
    np.testing.assert_array_equal(layer.forward(feat, image)[0].numpy(),
                                  layer._boxes((5, 6), (40, 48)))
    other = layer.forward(torch.zeros(1, 4, 3, 4), torch.zeros(1, 3, 24, 32))
    np.testing.assert_array_equal(other[0].numpy(), layer._boxes((3, 4), (24, 32)))


@pytest.mark.parametrize("params,loc_classes", CASES[:4])
def test_detection_output_row_by_row_overlaps_equal_reference(params, loc_classes, monkeypatch):
    """Past MATRIX_LIMIT candidates NMS computes one overlap row per kept box instead of the
    matrix; forced here on small inputs, it must give the same detections."""
    monkeypatch.setattr(ssd_detection, "MATRIX_LIMIT", 4)
    rng = np.random.default_rng(7)
    classes = int(params.split()[1])
    loc, conf, prior = random_inputs(rng, 2, 90, classes, loc_classes, score_levels=6)
    layer = make_layer(params, [loc.shape, conf.shape, prior.shape])
    got = layer.forward(torch.from_numpy(loc), torch.from_numpy(conf), torch.from_numpy(prior))
    np.testing.assert_array_equal(got.numpy()[0, 0], reference_forward(layer, loc, conf, prior))


@pytest.mark.parametrize("block", [256, 7])
@pytest.mark.parametrize("strike_ties", [False, True])
def test_nms_at_a_fixed_threshold_equals_the_visiting_loop(strike_ties, block, monkeypatch):
    """At eta = 1 NMS keeps boxes through integer bit masks; the loop kept for eta < 1 gives
    the same answer while its threshold cannot fall (thresholds of 0.5 and below never do):
    hundreds of boxes (masks past one machine word), overlaps at the threshold, NaN boxes."""
    monkeypatch.setattr(ssd_detection, "NMS_BLOCK", block)      # 7: 43 blocks, odd sizes
    rng = np.random.default_rng(11)
    corners = rng.integers(0, 20, (300, 2)).astype(F32) / F32(20)
    boxes = np.concatenate([corners, corners + F32(0.1)], axis=1)   # many exact overlaps
    boxes[rng.choice(300, 5, replace=False), 2] = np.nan
    for threshold in (0.0, 1 / 3, 0.5):
        fixed = ssd_detection.greedy_nms(boxes, threshold, 1.0, strike_ties=strike_ties)
        visited = ssd_detection.greedy_nms(boxes, threshold, 0.99, strike_ties=strike_ties)
        np.testing.assert_array_equal(fixed, visited)
        # YOLO's ">=" strikes every box at threshold 0 (overlaps of 0 included)
        assert 1 < len(fixed) < 300 or (strike_ties and threshold == 0 and len(fixed) == 1)


@pytest.mark.parametrize("matrix_limit", [ssd_detection.MATRIX_LIMIT, 4])
@pytest.mark.parametrize("eta", [1.0, 0.9])
def test_nms_stopped_at_a_count_keeps_the_head_of_the_full_answer(matrix_limit, eta,
                                                                  monkeypatch):
    """``limit`` (Proposal's post_nms_topN) ends the pass early, in blocks and on the
    row-per-kept-box path alike: the boxes kept first do not depend on later ones."""
    monkeypatch.setattr(ssd_detection, "MATRIX_LIMIT", matrix_limit)
    monkeypatch.setattr(ssd_detection, "NMS_BLOCK", 30)
    rng = np.random.default_rng(12)
    corners = rng.random((200, 2), dtype=F32)
    boxes = np.concatenate([corners, corners + F32(0.15)], axis=1)
    full = ssd_detection.greedy_nms(boxes, 0.6, eta)
    assert len(full) > 40
    for limit in (1, 17, 40, len(full), len(full) + 5):
        np.testing.assert_array_equal(ssd_detection.greedy_nms(boxes, 0.6, eta, limit=limit),
                                      full[:limit])


def test_overlaps_in_bands_equal_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(13)
    corners = rng.random((150, 2), dtype=F32)
    boxes = np.concatenate([corners, corners + rng.random((150, 2), dtype=F32) * F32(0.3)], 1)
    boxes[[3, 77], 1] = np.nan
    whole = ssd_detection._jaccard_band(boxes, boxes[:120])
    monkeypatch.setattr(ssd_detection, "JACCARD_BAND", 1000)       # 8 rows a band
    np.testing.assert_array_equal(ssd_detection.jaccard_matrix(boxes, boxes[:120]), whole)
