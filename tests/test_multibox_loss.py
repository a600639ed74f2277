"""SSD's MultiBoxLoss against an independent float64 reference written from the fork's
definitions (matching, encoding, mining, normalisation; tests/multibox_reference.py), its
gradients against the closed form and finite differences, every option, and a tiny SSD
trained by our solver until DetectionOutput finds the box."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat.engine.layers.base import LayerError
from layer_utils import gradcheck_layer
from multibox_reference import (C, PRIORS, ROWS, VARIANCE, encode, greedy_nms, ground_truth,
                                inputs, iou, label_blob, layer, logistic_row, match,
                                per_prior_losses, prior_blob, reference, run, softmax,
                                tiny_ssd_nets)


# -- closed form ---------------------------------------------------------------------------
BASE = dict(code="CENTER_SIZE", l2=False, mining=True, per_prediction=True, norm="VALID",
            loc_weight=1.0, ratio=3.0, neg_overlap=0.5)
CASES = {
    "center_size_smooth_l1_max_negative_valid": ("code_type: CENTER_SIZE", "", {}),
    "corner_l2_no_mining_full": ("code_type: CORNER loc_loss_type: L2 mining_type: NONE",
                                 "normalization: FULL",
                                 dict(code="CORNER", l2=True, mining=False, norm="FULL")),
    "corner_size_bipartite_batch_size_loc_weight": (
        "code_type: CORNER_SIZE match_type: BIPARTITE loc_weight: 2", "normalization: BATCH_SIZE",
        dict(code="CORNER_SIZE", per_prediction=False, norm="BATCH_SIZE", loc_weight=2.0)),
    "ratio_and_neg_overlap_none_normalization": (
        "code_type: CENTER_SIZE loc_loss_type: L2 neg_pos_ratio: 1.5 neg_overlap: 0.2",
        "normalization: NONE", dict(l2=True, ratio=1.5, neg_overlap=0.2, norm="NONE")),
}


def test_matching_by_hand():
    """Image 0: prior 0 takes box A bipartitely (IoU .68), prior 4 box B (.72); prior 5
    overlaps A by .566, matched only PER_PREDICTION. Image 1: prior 1 takes box C (.80);
    its difficult box (on prior 3) is dropped."""
    _, _, _, per = reference(*[t.numpy() for t in inputs()], ground_truth(), dict(BASE))
    _, _, _, bi = reference(*[t.numpy() for t in inputs()], ground_truth(),
                            dict(BASE, per_prediction=False))
    assert per[0].tolist() == [0, -1, -1, -1, 1, 0] and per[1].tolist() == [-1, 0, -1, -1, -1, -1]
    assert bi[0].tolist() == [0, -1, -1, -1, 1, -1]
    assert iou(PRIORS[5], ROWS[0][3:7]) == pytest.approx(0.1156 / 0.2044)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_equal_the_reference(case):
    params, loss_param, options = CASES[case]
    loc, conf = inputs()
    value, dloc, dconf = run(layer(params, loss_param), loc, conf)
    want, want_dloc, want_dconf, _ = reference(loc.numpy(), conf.numpy(), ground_truth(),
                                               dict(BASE, **options))
    assert value == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dloc, want_dloc, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dconf, want_dconf, rtol=1e-5, atol=1e-7)


def test_center_size_targets_with_variances():
    """One positive (prior 0, IoU .5625), loc predictions at its target: only the confidence
    loss of it and the 3 hardest of the 4 negatives remains."""
    rows, priors = [[0, 1, 0, 0.04, 0.04, 0.44, 0.54, 0]], PRIORS[:5]
    target = encode(np.array(rows[0][3:7]), PRIORS[0], np.array(VARIANCE), "CENTER_SIZE")
    # centres (.24, .29) vs (.2, .2) over a .4 side and variance .1; sizes .4 and .5 over .4
    assert target == pytest.approx([1.0, 2.25, 0.0, np.log(1.25) / 0.2])
    loc = torch.zeros(1, len(priors) * 4, dtype=torch.float64)
    loc[0, :4] = torch.tensor(target)
    conf = inputs(n=1)[1][:, :len(priors) * C]
    value, dloc, _ = run(layer("code_type: CENTER_SIZE", rows=1, n=1, priors=len(priors)),
                         loc, conf, rows=rows, priors=priors)
    probs = np.array([softmax(r) for r in conf.numpy().reshape(-1, C)])
    negatives = sorted(range(1, 5), key=lambda j: probs[j, 0])[:3]
    want = -np.log(probs[0, 1]) - sum(np.log(probs[j, 0]) for j in negatives)
    assert value == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dloc, 0, atol=1e-5)


def test_finite_differences():
    loc, conf = inputs()
    lay = layer("code_type: CENTER_SIZE")
    gradcheck_layer(lay, [loc, conf, prior_blob().double(), label_blob().double()])


def test_padding_and_difficult_rows():
    loc, conf = inputs()
    clean = [r for r in ROWS if r[0] != -1 and not r[7]]
    full = run(layer("code_type: CENTER_SIZE"), loc, conf)[0]
    assert full == pytest.approx(run(layer("code_type: CENTER_SIZE", rows=3), loc, conf,
                                     rows=clean)[0], rel=1e-12)
    with_difficult = run(layer("code_type: CENTER_SIZE use_difficult_gt: true"), loc, conf)[0]
    want = reference(loc.numpy(), conf.numpy(), ground_truth(True), dict(BASE))[0]
    assert with_difficult == pytest.approx(want, rel=1e-5) and with_difficult != full


def test_image_without_boxes_adds_nothing_when_mining():
    loc, conf = inputs()
    only_first = [r for r in ROWS if r[0] == 0]
    value = run(layer("code_type: CENTER_SIZE", rows=2), loc, conf, rows=only_first)
    first = run(layer("code_type: CENTER_SIZE", rows=2, n=1), loc[:1], conf[:1], rows=only_first)
    assert value[0] == pytest.approx(first[0], rel=1e-12)
    assert not value[1][1].any() and not value[2][1].any()


# -- options -------------------------------------------------------------------------------
def test_per_class_locations_use_the_matched_label_slot():
    """share_location: false (mining NONE, as SSD requires): the same matches, each box
    regressed by the predictions of its own class; the background slot is never used."""
    loc, conf = inputs(loc_classes=C)
    value, dloc, dconf = run(layer("share_location: false mining_type: NONE "
                                   "code_type: CENTER_SIZE", loc_classes=C), loc, conf)
    options = dict(BASE, mining=False)
    _, _, _, matches = reference(loc.numpy()[:, :24], conf.numpy(), ground_truth(), options)
    labels = {i: [g[2] for g in ground_truth() if g[0] == i] for i in range(2)}
    loc4 = loc.numpy().reshape(2, len(PRIORS), C, 4)
    slot = np.zeros((2, len(PRIORS)), dtype=int)
    for i, m in enumerate(matches):
        slot[i, m > -1] = [labels[i][k] for k in m[m > -1]]
    picked = np.take_along_axis(loc4, slot[:, :, None, None], axis=2)[:, :, 0]
    want, want_dloc, want_dconf, _ = reference(picked.reshape(2, -1), conf.numpy(),
                                               ground_truth(), options)
    assert value == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dconf, want_dconf, rtol=1e-5, atol=1e-7)
    expected = np.zeros_like(loc4)
    np.put_along_axis(expected, slot[:, :, None, None], want_dloc.reshape(2, -1, 1, 4), axis=2)
    expected[np.broadcast_to((slot == 0)[:, :, None, None], expected.shape)] = 0
    np.testing.assert_allclose(dloc.reshape(expected.shape), expected, rtol=1e-5, atol=1e-7)


def test_logistic_confidence_with_mining():
    loc, conf = inputs()
    value, dloc, dconf = run(layer("code_type: CENTER_SIZE conf_loss_type: LOGISTIC"), loc, conf)
    want, want_dloc, want_dconf, _ = reference(loc.numpy(), conf.numpy(), ground_truth(),
                                               dict(BASE), row=logistic_row)
    assert value == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dconf, want_dconf, rtol=1e-5, atol=1e-7)


def test_logistic_confidence_without_mining():
    """Every prior of the one image counts: one-hot targets for positives, all zeros (the
    background id 0 SSD fills with) for the rest."""
    loc, conf = inputs(n=1)
    value, _, dconf = run(layer("code_type: CENTER_SIZE conf_loss_type: LOGISTIC "
                                "mining_type: NONE loc_weight: 0", n=1), loc, conf)
    x = conf.numpy().reshape(-1, C)
    target = np.zeros_like(x)
    target[[0, 4, 5], [1, 2, 1]] = 1          # priors 0 and 5 take box A, prior 4 box B
    sig = 1 / (1 + np.exp(-x))
    want = -(target * np.log(sig) + (1 - target) * np.log(1 - sig)).sum() / 3
    assert value == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(dconf.reshape(-1, C), (sig - target) / 3, rtol=1e-6)


def test_per_class_matching_of_decoded_predictions():
    """Zero offsets decode to the priors, so matching them per class finds the same positives
    as matching the priors."""
    conf = inputs()[1]
    zero = torch.zeros(2, len(PRIORS) * C * 4, dtype=torch.float64)
    params = "share_location: false mining_type: NONE code_type: CENTER_SIZE"
    by_prior = run(layer(params, loc_classes=C), zero, conf)
    decoded = run(layer(params + " use_prior_for_matching: false", loc_classes=C), zero, conf)
    assert decoded[0] == pytest.approx(by_prior[0], rel=1e-6)
    np.testing.assert_allclose(decoded[2], by_prior[2], rtol=1e-6)


def test_hard_example_mining():
    """With sample_size >= priors every prior is kept (as mining NONE when each image has
    boxes); with sample_size 1 only each image's highest-loss prior counts."""
    loc, conf = inputs()
    everything = run(layer("code_type: CENTER_SIZE mining_type: HARD_EXAMPLE sample_size: 64"),
                     loc, conf)
    no_mining = run(layer("code_type: CENTER_SIZE mining_type: NONE"), loc, conf)
    assert everything[0] == pytest.approx(no_mining[0], rel=1e-12)
    value, _, dconf = run(layer("code_type: CENTER_SIZE mining_type: HARD_EXAMPLE "
                                "sample_size: 1"), loc, conf)
    losses, positive = per_prior_losses(loc.numpy(), conf.numpy())
    best = losses.argmax(axis=1)
    matches = positive[[0, 1], best].sum()
    assert value == pytest.approx(losses[[0, 1], best].sum() / max(1, matches), rel=1e-5)
    rows = np.abs(dconf.reshape(2, len(PRIORS), C)).sum(axis=2) > 0
    assert [np.flatnonzero(r).tolist() for r in rows] == [[best[0]], [best[1]]]


def test_mining_with_nms():
    """nms_param: SSD suppresses, by loss, candidates overlapping a kept one by more than
    the threshold before taking the hardest; an unset top_k (0) keeps none."""
    loc, conf = inputs()
    plain = run(layer("code_type: CENTER_SIZE"), loc, conf)[0]
    loose = "use_prior_for_nms: true nms_param { nms_threshold: 1 top_k: 100 }"
    assert run(layer("code_type: CENTER_SIZE " + loose), loc, conf)[0] == \
        pytest.approx(plain, rel=1e-12)
    no_top_k = run(layer("code_type: CENTER_SIZE nms_param { nms_threshold: 0.5 }"), loc, conf)
    assert not np.abs(no_top_k[2].reshape(2, -1, C)[0, [1, 2, 3]]).any()   # no negatives
    hard = ("code_type: CENTER_SIZE mining_type: HARD_EXAMPLE sample_size: 2 "
            "nms_param { nms_threshold: 0.1 top_k: 10 }")
    value, _, dconf = run(layer(hard + " use_prior_for_nms: true"), loc, conf)
    losses, positive = per_prior_losses(loc.numpy(), conf.numpy())
    kept = [greedy_nms(losses[i], 0.1)[:2] for i in range(2)]
    want = sum(losses[i, kept[i]].sum() for i in range(2))
    matches = sum(positive[i, kept[i]].sum() for i in range(2))
    assert value == pytest.approx(want / max(1, matches), rel=1e-5)
    rows = np.abs(dconf.reshape(2, len(PRIORS), C)).sum(axis=2) > 0
    assert [sorted(np.flatnonzero(r)) for r in rows] == [sorted(k) for k in kept]
    zero = torch.zeros_like(loc)
    assert run(layer(hard), zero, conf)[0] == pytest.approx(
        run(layer(hard + " use_prior_for_nms: true"), zero, conf)[0], rel=1e-6)


def test_map_object_to_agnostic_scores_every_object_as_class_one():
    loc, conf = inputs()
    conf2 = conf.reshape(2, -1, C)[:, :, :2].reshape(2, -1)
    agnostic = run(layer("code_type: CENTER_SIZE mining_type: NONE map_object_to_agnostic: true",
                         classes=2), loc, conf2)
    ones = [r[:1] + [1 if r[0] != -1 else -1] + r[2:] for r in ROWS]
    plain = run(layer("code_type: CENTER_SIZE mining_type: NONE", classes=2), loc, conf2,
                rows=ones)
    assert agnostic[0] == pytest.approx(plain[0], rel=1e-12)
    np.testing.assert_allclose(agnostic[2], plain[2], rtol=1e-12)


def test_variance_in_target_divides_predictions_but_not_their_gradient():
    """SSD divides predictions and unscaled targets by the variances; its backward passes
    the gradient of the scaled prediction straight to the prediction."""
    loc, conf = inputs()
    value, dloc, _ = run(layer("code_type: CENTER_SIZE encode_variance_in_target: true"), loc, conf)
    scaled = loc.numpy() / np.tile(VARIANCE, len(PRIORS))
    want, want_dloc, _, _ = reference(scaled, conf.numpy(), ground_truth(), dict(BASE))
    assert value == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(dloc, want_dloc, rtol=1e-5, atol=1e-7)


CROSSING = PRIORS.copy()
CROSSING[0] = [-0.04, 0.0, 0.36, 0.4]     # still box A's best prior (IoU .5625)


def test_bp_inside_stops_the_gradient_of_a_coordinate_outside_the_image():
    loc, conf = inputs()
    value, dloc, _ = run(layer("code_type: CENTER_SIZE bp_inside: true"), loc, conf,
                         priors=CROSSING)
    target = encode(np.array(ROWS[0][3:7]), CROSSING[0], np.array(VARIANCE), "CENTER_SIZE")
    at_target = loc.numpy().copy()
    at_target[0, 0] = target[0]              # xmin of prior 0 is outside: as if exact
    want, want_dloc, _, _ = reference(at_target, conf.numpy(), ground_truth(), dict(BASE),
                                      priors=CROSSING)
    assert value == pytest.approx(want, rel=1e-5)
    assert dloc[0, 0] == 0
    np.testing.assert_allclose(dloc, want_dloc, rtol=1e-5, atol=1e-6)


def test_ignore_cross_boundary_bbox_drops_the_prior():
    loc, conf = inputs()
    value, dloc, dconf = run(layer("code_type: CENTER_SIZE ignore_cross_boundary_bbox: true"),
                             loc, conf, priors=CROSSING)
    rest = lambda x, k: x.numpy().reshape(2, len(PRIORS), k)[:, 1:].reshape(2, -1)
    want, _, _, _ = reference(rest(loc, 4), rest(conf, C), ground_truth(), dict(BASE),
                              priors=CROSSING[1:])
    assert value == pytest.approx(want, rel=1e-5)
    assert not dloc[:, :4].any() and not dconf[:, :C].any()


def test_matching_decoded_predictions():
    """use_prior_for_matching: false matches the decoded boxes: zero offsets decode to the
    priors; an offset that moves prior 2 onto box A makes it A's bipartite match."""
    loc, conf = inputs()
    zero = torch.zeros_like(loc)
    by_prior = run(layer("code_type: CENTER_SIZE"), zero, conf)
    decoded = run(layer("code_type: CENTER_SIZE use_prior_for_matching: false"), zero, conf)
    assert decoded[0] == pytest.approx(by_prior[0], rel=1e-6)
    moved = zero.clone()
    moved[0, 8:12] = torch.tensor(encode(np.array(ROWS[0][3:7]), PRIORS[2], np.array(VARIANCE),
                                         "CENTER_SIZE"))
    _, dloc, dconf = run(layer("code_type: CENTER_SIZE use_prior_for_matching: false"), moved,
                         conf)
    assert dconf.reshape(2, -1, C)[0, 2, 1] < 0              # prior 2 is a positive of class 1
    np.testing.assert_allclose(dloc[0, 8:12], 0, atol=1e-5)  # and its box is exact


def test_propagate_down_false_leaves_the_term_out():
    loc, conf = inputs()
    both = run(layer("code_type: CENTER_SIZE"), loc, conf)[0]
    pd = 'propagate_down: {} propagate_down: {} propagate_down: false propagate_down: false'
    only_loc = run(layer("code_type: CENTER_SIZE", extra=pd.format("true", "false")), loc, conf)
    only_conf = run(layer("code_type: CENTER_SIZE", extra=pd.format("false", "true")), loc, conf)
    assert only_loc[0] + only_conf[0] == pytest.approx(both, rel=1e-12)
    assert not only_loc[2].any() and not only_conf[1].any()


@pytest.mark.parametrize("params, extra, message", [
    ("mining_type: HARD_EXAMPLE sample_size: 0", "",
     r"layer 'mbox_loss' \(MultiBoxLoss\): mining_type HARD_EXAMPLE needs sample_size > 0"),
    ("do_neg_mining: false", "", r"do_neg_mining: false contradicts mining_type MAX_NEGATIVE"),
    ("share_location: false", "", r"negative mining needs share_location: true"),
    ("background_label_id: 3", "", r"background_label_id 3 must be below num_classes 3"),
    ("map_object_to_agnostic: true", "", r"map_object_to_agnostic needs num_classes: 2"),
    ("", "propagate_down: true propagate_down: true propagate_down: true propagate_down: false",
     r"cannot propagate down to the priors or the labels"),
])
def test_contradictory_options_are_named(params, extra, message):
    with pytest.raises(LayerError, match=message):
        layer(params, extra=extra, loc_classes=C if "share_location" in params else 1)


def test_bad_data_is_named():
    loc, conf = inputs()
    with pytest.raises(LayerError, match=r"'mbox_loss'.*background label 0"):
        run(layer(""), loc, conf, rows=[[0, 0, 0, 0.1, 0.1, 0.5, 0.5, 0]] + ROWS[1:])
    with pytest.raises(LayerError, match=r"'mbox_loss'.*label 7 of image 0 is outside \[0, 3\)"):
        run(layer(""), loc, conf, rows=[[0, 7, 0] + ROWS[0][3:]] + ROWS[1:])
    with pytest.raises(LayerError, match=r"6 priors need 24 loc values per image"):
        layer("", priors=6, loc_classes=2)


# -- end to end ----------------------------------------------------------------------------
def test_a_tiny_ssd_learns_one_box_and_detection_output_finds_it(tmp_path, monkeypatch):
    import caffe_compat as caffe
    monkeypatch.setenv("GLOG_minloglevel", "1")
    train, deploy = tiny_ssd_nets()
    (tmp_path / "train.prototxt").write_text(train)
    (tmp_path / "deploy.prototxt").write_text(deploy)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "train.prototxt"}"\nbase_lr: 0.05\nlr_policy: "fixed"\n'
        'momentum: 0.9\nmax_iter: 40\ndisplay: 0\nsnapshot_after_train: false\nrandom_seed: 3\n')
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    image = np.full((1, 3, 16, 16), 0.1, dtype=np.float32)
    image[:, :, 2:10, 2:10] = 1.0                                 # one box, pixels 2..10
    box = np.array([2, 2, 10, 10]) / 16
    solver.net.blobs["data"].data[...] = image
    solver.net.blobs["label"].data[...] = np.array([0, 1, 0, *box, 0]).reshape(1, 1, 1, 8)
    losses = []
    for _ in range(40):
        solver.step(1)
        losses.append(float(solver.net.blobs["mbox_loss"].data))
    assert losses[-1] < 0.2 * losses[0]
    solver.net.save(str(tmp_path / "trained.caffemodel"))
    net = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "trained.caffemodel"),
                    caffe.TEST)
    net.blobs["data"].data[...] = image
    best = net.forward()["detection_out"][0, 0, 0]               # [image, label, score, box]
    assert best[1] == 1 and best[2] > 0.5
    assert iou(best[3:], box) > 0.7
