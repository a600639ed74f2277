"""caffe-face's CenterLoss and R-FCN's OHEM pieces (BoxAnnotatorOHEM, SoftmaxWithLoss' per-RoI
top, SmoothL1Loss with three bottoms and PRE_FIXED) against float64 re-statements of the forks'
loops (docs/forks.md), a finite-difference check, the solver's update and an R-FCN-style net."""
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer
from test_stl_sort import KEYS, LIBSTDCXX_ORDER    # keys with ties, and g++'s std::sort order

CENTER = ('name: "center_loss" type: "CenterLoss" center_loss_param {{ num_output: {n} '
          'center_filler {{ type: "gaussian" std: 1 }} {extra} }}')


def center_layer(shape, classes=4, extra=""):
    return make_layer(CENTER.format(n=classes, extra=extra), [shape, (shape[0],)], caffe.TRAIN)


def center_reference(x, labels, centers):
    """caffe-face's forward and backward, one sample and one class at a time, in float64:
    (loss, features' diff for a top diff of 1, the centers' diff)."""
    m = len(x)
    flat = x.reshape(m, -1)
    distance = np.stack([flat[i] - centers[int(labels[i])] for i in range(m)])
    loss = float((distance ** 2).sum()) / m / 2
    center_diff = np.zeros_like(centers)
    for j in range(len(centers)):
        members = [i for i in range(m) if int(labels[i]) == j]
        total = sum((-distance[i] for i in members), np.zeros(centers.shape[1]))
        center_diff[j] = total / (len(members) + 1)
    return loss, (distance / m).reshape(x.shape), center_diff


def _case(seed=0, shape=(6, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    labels = torch.tensor([0., 2., 2., 0., 3., 2.])[:shape[0]]      # class 1 has no sample
    return x, labels


@pytest.mark.parametrize("top_diff", [1.0, 0.25])
def test_center_loss_matches_the_fork_loops(top_diff):
    x, labels = _case()
    layer = center_layer(x.shape)
    centers = layer.blobs[0].detach().double().numpy().copy()
    features = x.clone().requires_grad_(True)
    loss = layer(features, labels)
    loss.backward(torch.tensor(top_diff))
    ref_loss, ref_grad, ref_center_diff = center_reference(x.double().numpy(),
                                                           labels.numpy(), centers)
    assert layer.blobs[0].shape == (4, 4)                     # [num_output, K]
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(features.grad.numpy(), top_diff * ref_grad, rtol=1e-5, atol=1e-7)
    # the centers' diff ignores the top's diff (the loss_weight): the fork's update direction
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), ref_center_diff, rtol=1e-5, atol=1e-7)
    assert not layer.blobs[0].grad[1].any()                   # a class with no sample: 0


def test_center_loss_feature_gradient_by_finite_differences():
    x, labels = _case(1)
    layer = center_layer(x.shape)
    layer.blobs[0].requires_grad_(False)      # its diff is the fork's update, not a gradient
    gradcheck_layer(layer, [x.double(), labels.double()])


def test_center_diff_is_not_the_centers_gradient():
    """The fork's center diff divides by 1 + n_j, not by M: it is no derivative of the loss."""
    x, labels = _case(2)
    layer = center_layer(x.shape).double()
    layer(x.double(), labels.double()).backward()
    counts = torch.bincount(labels.long(), minlength=4).double()
    true_gradient = layer.blobs[0].grad * (counts + 1)[:, None] / len(x)
    assert not torch.allclose(layer.blobs[0].grad, true_gradient)


def test_center_loss_axis_flattens_the_trailing_axes():
    x = torch.randn(6, 1, 3, 2)
    layer = center_layer(x.shape, extra="axis: 2")
    assert layer.blobs[0].shape == (4, 6)
    ref_loss, _, _ = center_reference(x.double().numpy(), _case()[1].numpy(),
                                      layer.blobs[0].detach().double().numpy())
    assert layer(x, _case()[1]).item() == pytest.approx(ref_loss, rel=1e-6)


@pytest.mark.parametrize("text, shapes, message", [
    ('center_loss_param { }', [(4, 3), (4,)], "num_output must be set"),
    ('center_loss_param { num_output: 2 axis: 2 }', [(4, 3, 2), (4,)], "axes from"),
    ('center_loss_param { num_output: 2 }', [(4, 3), (4, 2)], "one label per sample"),
    ('center_loss_param { num_output: 2 axis: 5 }', [(4, 3), (4,)], "axis"),
    ('center_loss_param { num_output: 2 center_filler { type: "nope" } }', [(4, 3), (4,)],
     "center_filler"),
])
def test_center_loss_bad_params_name_the_layer(text, shapes, message):
    with pytest.raises(LayerError, match=f"layer 'c' \\(CenterLoss\\).*{message}|{message}"
                                         ".*layer 'c'"):
        make_layer(f'name: "c" type: "CenterLoss" {text}', shapes)


def test_center_loss_refuses_a_label_without_a_center():
    layer = center_layer((2, 3), classes=3)
    with pytest.raises(LayerError, match=r"label 3 is out of range.*\[0, 3\)"):
        layer(torch.zeros(2, 3), torch.tensor([0., 3.]))


# ---------------------------------------------------------------- through the solver
FACE_NET = """
name: "face"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 6 dim: 3 } shape { dim: 6 } } }
layer { name: "fc5" type: "InnerProduct" bottom: "data" top: "fc5"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc5" bottom: "label" top: "loss" }
layer { name: "center_loss" type: "CenterLoss" bottom: "data" bottom: "label"
  top: "center_loss" param { lr_mult: 1 decay_mult: 2 }
  center_loss_param { num_output: 3 center_filler { type: "gaussian" std: 2 } }
  loss_weight: 0.008 }
"""
SOLVER = ('net: "face.prototxt"\nbase_lr: 0.5\nlr_policy: "fixed"\nmomentum: 0.5\n'
          'weight_decay: 0.01\nmax_iter: 10\ndisplay: 0\n')


def test_solver_moves_centers_by_the_forks_rule(tmp_path, monkeypatch):
    """SGD with momentum and weight decay (decay_mult 2), by hand in float64: the centers'
    history is 0.5·v + 0.5·(diff + 0.02·c), whatever the loss_weight; they near the class means."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLOG_minloglevel", "1")
    Path("face.prototxt").write_text(FACE_NET)
    Path("solver.prototxt").write_text(SOLVER)
    solver = caffe.get_solver("solver.prototxt")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 1, 2, 0, 1], np.float32)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = labels
    centers = solver.net.params["center_loss"][0].data.astype(np.float64).copy()
    means = np.stack([x[labels == j].mean(0) for j in range(3)]).astype(np.float64)
    history = np.zeros_like(centers)
    start = np.linalg.norm(centers - means)
    for _ in range(6):
        solver.step(1)
        _, _, diff = center_reference(x.astype(np.float64), labels, centers)
        history = 0.5 * history + 0.5 * (diff + 0.01 * 2 * centers)
        centers = centers - history
        np.testing.assert_allclose(solver.net.params["center_loss"][0].data, centers,
                                   rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(centers - means) < 0.5 * start


# ---------------------------------------------------------------- BoxAnnotatorOHEM
def ohem(roi_per_img, shapes, ignore=""):
    text = (f'name: "ohem" type: "BoxAnnotatorOHEM" box_annotator_ohem_param {{ '
            f'roi_per_img: {roi_per_img} {ignore} }}')
    return make_layer(text, shapes, caffe.TRAIN)


def ohem_reference(images, losses, labels, weights, roi_per_img, ignore, order):
    """The fork's walk over the RoIs in ``order`` (hardest first), in float64."""
    out_labels = np.full(len(labels), float(ignore))
    out_weights = np.zeros_like(weights, dtype=np.float64)
    left = {}
    for index in order:
        image = int(images[index])
        if left.setdefault(image, roi_per_img) > 0:
            left[image] -= 1
            out_labels[index] = labels[index]
            out_weights[index] = weights[index]
    return out_labels, out_weights


def _rois(images):
    boxes = np.tile(np.float32([1, 2, 30, 40]), (len(images), 1))
    return torch.from_numpy(np.column_stack([np.float32(images), boxes]))


def test_ohem_hand_worked_case_with_ties():
    # image 0: RoIs 0-2 (losses .5 .9 .5), image 1: RoIs 3-5 (.5 .2 .9); two per image: the
    # tie in image 0 goes to the earlier RoI (std::sort of so few is an insertion sort)
    rois = _rois([0, 0, 0, 1, 1, 1])
    loss = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.2, 0.9])
    labels = torch.tensor([1., 2., 3., 4., 5., 6.])
    weights = torch.arange(1., 25.).view(6, 4)
    layer = ohem(2, [rois.shape, loss.shape, labels.shape, weights.shape], "ignore_label: -3")
    out_labels, out_weights = layer(rois, loss, labels, weights)
    assert out_labels.shape == (6, 1, 1, 1) and out_weights.shape == (6, 4, 1, 1)
    assert out_labels.flatten().tolist() == [1., 2., -3., 4., -3., 6.]
    kept = torch.tensor([1., 1., 0., 1., 0., 1.])[:, None]
    assert torch.equal(out_weights.view(6, 4), weights * kept)


def test_ohem_ties_follow_libstdcxx_sort_not_a_stable_one():
    """20 RoIs of one image with tied losses: the five kept are g++'s std::sort's first five."""
    n = len(KEYS)
    layer = ohem(5, [(n, 5, 1, 1), (n, 1, 1, 1), (n, 1, 1, 1), (n, 2, 1, 1)])
    labels = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    out, _ = layer(_rois([0] * n).view(n, 5, 1, 1), torch.from_numpy(KEYS).view(n, 1, 1, 1),
                   labels, torch.ones(n, 2, 1, 1))
    kept = set(np.flatnonzero(out.flatten().numpy() >= 0).tolist())
    assert kept == set(LIBSTDCXX_ORDER[:5])
    assert kept != set(np.argsort(-KEYS, kind="stable")[:5].tolist())


def test_ohem_random_losses_match_an_argsort_reference():
    rng = np.random.default_rng(4)
    n = 300
    images = rng.integers(0, 3, n)
    losses = rng.random(n).astype(np.float32)           # distinct: every sort agrees
    labels = rng.integers(0, 21, n).astype(np.float32)
    weights = rng.random((n, 8)).astype(np.float32)
    layer = ohem(40, [(n, 5), (n,), (n,), (n, 8)])
    out_labels, out_weights = layer(_rois(images), torch.from_numpy(losses),
                                    torch.from_numpy(labels), torch.from_numpy(weights))
    order = np.argsort(-losses.astype(np.float64), kind="stable")
    ref_labels, ref_weights = ohem_reference(images, losses, labels, weights, 40, -1, order)
    np.testing.assert_array_equal(out_labels.flatten().numpy(), ref_labels)
    np.testing.assert_array_equal(out_weights.view(n, 8).numpy(), ref_weights)
    assert (out_labels >= 0).sum().item() == 120


@pytest.mark.parametrize("text, shapes, message", [
    ("", [(4, 5), (4,), (4,), (4, 8)], "roi_per_img must be set"),
    ("roi_per_img: 2", [(4, 4), (4,), (4,), (4, 8)], r"bottom 0 \(rois\) must be \[R, 5, H, W\]"),
    ("roi_per_img: 2", [(4, 5), (3,), (4,), (4, 8)], r"bottom 1 \[3\] must be \[4, 1, 1, 1\]"),
    ("roi_per_img: 2", [(4, 5), (4,), (4, 2), (4, 8)], r"bottom 2 \[4, 2\] must be"),
    ("roi_per_img: 2", [(4, 5), (4,), (4,), (5, 8)], r"bottom 3 \[5, 8\] must be \[4, B, 1, 1\]"),
])
def test_ohem_bad_params_and_shapes_name_the_layer(text, shapes, message):
    body = f"box_annotator_ohem_param {{ {text} }}" if text else ""
    with pytest.raises(LayerError, match=f"layer 'ohem' \\(BoxAnnotatorOHEM\\).*{message}|"
                                         f"{message}.*layer 'ohem'"):
        make_layer(f'name: "ohem" type: "BoxAnnotatorOHEM" {body}', shapes)


def test_ohem_refuses_a_negative_image_index():
    layer = ohem(2, [(2, 5), (2,), (2,), (2, 4)])
    with pytest.raises(LayerError, match="negative image index"):
        layer(_rois([0, -1]), torch.ones(2), torch.ones(2), torch.ones(2, 4))


# ---------------------------------------------------------------- R-FCN's loss tops
def smooth_l1(d):
    return np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)


def test_rfcn_smooth_l1_pre_fixed_per_roi_top_and_gradient():
    layer = make_layer('name: "l" type: "SmoothL1Loss" top: "loss" top: "per_roi" loss_param '
                       '{ normalization: PRE_FIXED pre_fixed_normalizer: 5 }', [(3, 4)] * 3)
    g = torch.Generator().manual_seed(5)
    pred = (torch.randn(3, 4, generator=g) * 2).requires_grad_(True)
    target = torch.randn(3, 4, generator=g)
    inside = torch.tensor([[0.5, 2, 1, 0]] * 3)
    loss, per_roi = layer(pred, target, inside)
    d = (inside * (pred - target)).detach().double().numpy()
    assert loss.item() == pytest.approx(smooth_l1(d).sum() / 5, rel=1e-6)
    assert per_roi.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(per_roi.flatten().numpy(), smooth_l1(d).sum(1), rtol=1e-6)
    loss.backward()
    # R-FCN's backward: f'(d) / normalizer, without the inside weight's factor
    np.testing.assert_allclose(pred.grad.numpy(), np.clip(d, -1, 1) / 5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode, divisor", [("VALID", 3 * 2 * 2), ("FULL", 3 * 2 * 2),
                                           ("BATCH_SIZE", 3), ("NONE", 1)])
def test_rfcn_smooth_l1_normalization_modes(mode, divisor):
    layer = make_layer(f'name: "l" type: "SmoothL1Loss" loss_param {{ normalization: {mode} }}',
                       [(3, 4, 2, 2)] * 2)
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = smooth_l1((pred - target).double().numpy()).sum() / divisor
    assert layer(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_pre_fixed_is_refused_where_the_fork_aborts():
    with pytest.raises(LayerError, match="PRE_FIXED is only read by SmoothL1Loss"):
        make_layer('name: "s" type: "SoftmaxWithLoss" loss_param { normalization: PRE_FIXED }',
                   [(3, 4), (3,)])


def test_softmax_loss_third_top_is_each_rois_loss():
    layer = make_layer('name: "s" type: "SoftmaxWithLoss" top: "l" top: "p" top: "per_roi" '
                       'loss_param { ignore_label: -1 }', [(4, 3), (4,)])
    scores = torch.randn(4, 3)
    labels = torch.tensor([2., -1., 0., 1.])
    _, prob, per_roi = layer(scores, labels)
    logp = torch.log_softmax(scores.double(), 1).numpy()
    expected = [-logp[0, 2], 0.0, -logp[2, 0], -logp[3, 1]]
    assert per_roi.shape == (4,) and prob.shape == (4, 3)
    np.testing.assert_allclose(per_roi.numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------- R-FCN's OHEM wiring
RFCN_OHEM = """
name: "rfcn_ohem"
input: "rois" input_dim: 6 input_dim: 5 input_dim: 1 input_dim: 1
input: "feat" input_dim: 6 input_dim: 4 input_dim: 1 input_dim: 1
input: "labels" input_dim: 6 input_dim: 1 input_dim: 1 input_dim: 1
input: "bbox_targets" input_dim: 6 input_dim: 8 input_dim: 1 input_dim: 1
input: "bbox_loss_weights" input_dim: 6 input_dim: 8 input_dim: 1 input_dim: 1
force_backward: true
layer { name: "cls_score" type: "InnerProduct" bottom: "feat" top: "cls_score"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "feat" top: "bbox_pred"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "per_roi_loss_cls" type: "SoftmaxWithLoss" bottom: "cls_score" bottom: "labels"
  top: "temp_loss_cls" top: "temp_prob_cls" top: "per_roi_loss_cls"
  loss_weight: 0 loss_weight: 0 loss_weight: 0 propagate_down: false propagate_down: false }
layer { name: "per_roi_loss_bbox" type: "SmoothL1Loss" bottom: "bbox_pred"
  bottom: "bbox_targets" bottom: "bbox_loss_weights" top: "temp_loss_bbox"
  top: "per_roi_loss_bbox" loss_weight: 0 loss_weight: 0
  propagate_down: false propagate_down: false propagate_down: false }
layer { name: "per_roi_loss" type: "Eltwise" bottom: "per_roi_loss_cls"
  bottom: "per_roi_loss_bbox" top: "per_roi_loss" propagate_down: false propagate_down: false }
layer { bottom: "rois" bottom: "per_roi_loss" bottom: "labels" bottom: "bbox_loss_weights"
  top: "labels_ohem" top: "bbox_loss_weights_ohem" name: "annotator_detector"
  type: "BoxAnnotatorOHEM" box_annotator_ohem_param { roi_per_img: 2 ignore_label: -1 }
  propagate_down: false propagate_down: false propagate_down: false propagate_down: false }
layer { name: "silence" type: "Silence" bottom: "temp_loss_cls" bottom: "temp_prob_cls"
  bottom: "temp_loss_bbox" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "cls_score" bottom: "labels_ohem"
  top: "loss_cls" loss_weight: 1 loss_param { ignore_label: -1 }
  propagate_down: true propagate_down: false }
layer { name: "loss_bbox" type: "SmoothL1Loss" bottom: "bbox_pred" bottom: "bbox_targets"
  bottom: "bbox_loss_weights_ohem" top: "loss_bbox" loss_weight: 1
  loss_param { normalization: PRE_FIXED pre_fixed_normalizer: 4 }
  propagate_down: true propagate_down: false propagate_down: false }
"""


def test_rfcn_ohem_fragment_builds_and_trains_only_the_hardest_rois(tmp_path):
    path = tmp_path / "train_val.prototxt"
    path.write_text(RFCN_OHEM)
    net = caffe.Net(str(path), caffe.TRAIN)
    rng = np.random.default_rng(6)
    images = np.array([0, 0, 0, 1, 1, 1], np.float32)
    net.blobs["rois"].data[...] = _rois(images).numpy().reshape(6, 5, 1, 1)
    net.blobs["feat"].data[...] = rng.normal(size=(6, 4, 1, 1))
    net.blobs["labels"].data[...] = np.array([1, 0, 1, 0, 1, 1]).reshape(6, 1, 1, 1)
    net.blobs["bbox_targets"].data[...] = rng.normal(size=(6, 8, 1, 1))
    net.blobs["bbox_loss_weights"].data[...] = np.repeat([[0, 0, 0, 0, 1, 1, 1, 1]], 6, 0)[
        ..., None, None] * net.blobs["labels"].data.reshape(6, 1, 1, 1)
    net.forward()
    net.backward()
    score = net.blobs["cls_score"].data.reshape(6, 2).astype(np.float64)
    labels = net.blobs["labels"].data.reshape(6)
    logp = score - np.log(np.exp(score).sum(1, keepdims=True))
    cls_loss = -logp[np.arange(6), labels.astype(int)]
    weights = net.blobs["bbox_loss_weights"].data.reshape(6, 8)
    d = weights * (net.blobs["bbox_pred"].data.reshape(6, 8)
                   - net.blobs["bbox_targets"].data.reshape(6, 8))
    per_roi = cls_loss + smooth_l1(d).sum(1)
    np.testing.assert_allclose(net.blobs["per_roi_loss"].data.reshape(6), per_roi, rtol=1e-5)
    order = np.argsort(-per_roi, kind="stable")
    ref_labels, ref_weights = ohem_reference(images, per_roi, labels, weights, 2, -1, order)
    np.testing.assert_array_equal(net.blobs["labels_ohem"].data.reshape(6), ref_labels)
    kept = ref_labels >= 0
    assert net.blobs["loss_cls"].data == pytest.approx(cls_loss[kept].mean(), rel=1e-5)
    assert net.blobs["loss_bbox"].data == pytest.approx(
        smooth_l1(d * ref_weights).sum() / 4, rel=1e-5)
    # only the kept RoIs send gradient back to the class scores
    grad = net.blobs["cls_score"].diff.reshape(6, 2)
    assert not grad[~kept].any() and np.abs(grad[kept]).sum() > 0
