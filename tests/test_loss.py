"""SoftmaxWithLoss, InfogainLoss, EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss, Accuracy:
Caffe goldens, float64 gradient checks, closed-form values and errors."""
from __future__ import annotations

import math

import pytest
import torch

import caffe_compat.engine.layers.loss  # noqa: F401  (registers the layers)
from caffe_compat.formats.blob_io import write_blobproto
from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer
from test_common import run_golden

FLT_MIN = 1.17549435e-38


@pytest.mark.parametrize("case", ["softmax_loss_none", "softmax_loss_valid_ignore",
                                  "softmax_loss_batchsize_weight", "softmax_axis2_loss_full",
                                  "euclidean_sigmoid_ce", "hinge_l1_l2", "accuracy_topk",
                                  "accuracy_ignore_axis"])
def test_golden(case):
    run_golden(case)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(classes, *shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=g).double()


# -- SoftmaxWithLoss -------------------------------------------------------------------
def _reference_softmax_loss(x, label, axis, ignore, mode):
    """Straight from the definition: -sum log p[label] over valid positions / normalizer."""
    logp = torch.log_softmax(x, axis).movedim(axis, -1).reshape(label.numel(), -1)
    lab = label.reshape(-1).long()
    valid = lab != ignore if ignore is not None else torch.ones_like(lab, dtype=torch.bool)
    picked = logp[torch.arange(lab.numel()), lab.clamp(min=0)]
    outer = math.prod(x.shape[:axis])
    norm = {"FULL": lab.numel(), "VALID": int(valid.sum()), "BATCH_SIZE": outer, "NONE": 1}[mode]
    return -(picked * valid).sum() / max(1, norm)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("axis, shape, label_shape", [(1, (2, 3, 2, 2), (2, 1, 2, 2)),
                                                     (2, (2, 3, 4), (2, 3))])
def test_softmax_loss_modes_and_gradcheck(mode, axis, shape, label_shape):
    text = (f'type: "SoftmaxWithLoss" softmax_param {{ axis: {axis} }} '
            f'loss_param {{ normalization: {mode} ignore_label: 1 }}')
    layer = make_layer(text, [shape, label_shape])
    assert layer.top_shapes([shape, label_shape]) == [()]
    x, label = _rand(*shape), _labels(shape[axis], *label_shape)
    loss = layer(x, label)
    assert loss.shape == ()
    torch.testing.assert_close(loss, _reference_softmax_loss(x, label, axis, 1, mode))
    gradcheck_layer(layer, [x, label])


@pytest.mark.parametrize("normalize, expected_norm", [("true", 2), ("false", 3)])
def test_softmax_loss_legacy_normalize(normalize, expected_norm):
    # 3 samples, one ignored: VALID divides by 2, BATCH_SIZE by 3.
    text = f'type: "SoftmaxWithLoss" loss_param {{ normalize: {normalize} ignore_label: 0 }}'
    layer = make_layer(text, [(3, 2), (3,)])
    x = torch.zeros(3, 2)
    torch.testing.assert_close(layer(x, torch.tensor([0.0, 1.0, 1.0])),
                               torch.tensor(2 * math.log(2) / expected_norm))
    # normalization, when given, wins over normalize.
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ normalize: {normalize} '
                       'normalization: NONE }', [(3, 2), (3,)])
    torch.testing.assert_close(layer(x, torch.tensor([0.0, 1.0, 1.0])), torch.tensor(3 * math.log(2)))


def test_softmax_loss_flt_min_clamp_keeps_caffe_gradient():
    layer = make_layer('type: "SoftmaxWithLoss"', [(1, 2), (1,)])
    x = torch.tensor([[0.0, -200.0]], requires_grad=True)
    loss = layer(x, torch.tensor([1.0]))
    torch.testing.assert_close(loss, torch.tensor(-math.log(FLT_MIN)))
    loss.backward()
    # Caffe's gradient is p - onehot even where the log was clamped.
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, -1.0]]))


def test_softmax_loss_all_ignored_and_prob_top():
    layer = make_layer('type: "SoftmaxWithLoss" top: "loss" top: "prob" loss_param { ignore_label: 0 }',
                       [(2, 3), (2,)])
    assert layer.top_shapes([(2, 3), (2,)]) == [(), (2, 3)]
    x = _rand(2, 3).requires_grad_()
    loss, prob = layer(x, torch.zeros(2))
    assert loss.item() == 0.0  # normalizer floored at 1, not 0/0
    torch.testing.assert_close(prob, torch.softmax(x, 1).detach())
    assert not prob.requires_grad


@pytest.mark.parametrize("shapes, labels, message", [
    ([(2, 3, 4), (2, 3)], None, "number of labels"),
    ([(2, 3), (3,)], None, "same first dimension"),
])   # labels outside [0, C): tests/test_fork_semantics.py (release-build tolerance)
def test_softmax_loss_errors(shapes, labels, message):
    with pytest.raises(LayerError, match=message):
        layer = make_layer('name: "loss" type: "SoftmaxWithLoss"', shapes)
        layer(torch.zeros(shapes[0]), torch.tensor(labels))


# -- InfogainLoss ----------------------------------------------------------------------
def test_infogain_identity_equals_softmax_loss_and_gradcheck(tmp_path):
    shape, label_shape = (3, 4, 2), (3, 2)
    x, label = _rand(*shape), _labels(4, *label_shape)
    soft = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 2 }', [shape, label_shape])
    info = make_layer('type: "InfogainLoss" loss_param { ignore_label: 2 }',
                      [shape, label_shape, (4, 4)])
    torch.testing.assert_close(info(x, label, torch.eye(4, dtype=torch.float64)), soft(x, label))
    H = _rand(4, 4, seed=5).abs()
    gradcheck_layer(info, [x, label, H])
    # H from a BlobProto file, legacy 1x1xCxC as Caffe's tools write it.
    path = tmp_path / "H.binaryproto"
    write_blobproto(path, H.float().numpy().reshape(1, 1, 4, 4))
    from_file = make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" }}',
                           [shape, label_shape])
    with_bottom = make_layer('type: "InfogainLoss"', [shape, label_shape, (4, 4)])
    torch.testing.assert_close(from_file(x.float(), label.float()),
                               with_bottom(x.float(), label.float(), H.float()))


def test_infogain_errors():
    with pytest.raises(LayerError, match="infogain matrix as bottom 2"):
        make_layer('name: "i" type: "InfogainLoss"', [(2, 3), (2,)])
    with pytest.raises(LayerError, match="must be 3x3"):
        make_layer('name: "i" type: "InfogainLoss"', [(2, 3), (2,), (2, 2)])
    with pytest.raises(LayerError, match="normalization"):
        make_layer('name: "i" type: "InfogainLoss" loss_param { normalize: true }',
                   [(2, 3), (2,), (3, 3)])


# -- EuclideanLoss / SigmoidCrossEntropyLoss / HingeLoss -------------------------------
def test_euclidean():
    layer = make_layer('type: "EuclideanLoss"', [(3, 4), (3, 2, 2)])
    a, b = _rand(3, 4), _rand(3, 2, 2, seed=1)
    torch.testing.assert_close(layer(a, b), ((a - b.reshape(3, 4)) ** 2).sum() / 6)
    gradcheck_layer(layer, [a, b])  # both bottoms get a gradient
    with pytest.raises(LayerError, match="same size per sample"):
        make_layer('name: "e" type: "EuclideanLoss"', [(3, 4), (3, 5)])


@pytest.mark.parametrize("loss_param, norm", [("", 3), ("normalization: FULL", 24),
                                              ("normalize: true", None), ("normalization: NONE", 1)])
def test_sigmoid_cross_entropy(loss_param, norm):
    layer = make_layer(f'type: "SigmoidCrossEntropyLoss" loss_param {{ {loss_param} ignore_label: -1 }}',
                       [(3, 8), (3, 8)])
    x = _rand(3, 8) * 30  # large logits: the stable form must not overflow
    t = torch.rand(3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t[0, :3] = -1  # ignored
    valid = t != -1
    per = torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    n = int(valid.sum()) if norm is None else norm
    torch.testing.assert_close(layer(x, t), (per * valid).sum() / n)
    gradcheck_layer(layer, [x / 30, t])


def test_sigmoid_cross_entropy_target_gets_no_gradient():
    layer = make_layer('type: "SigmoidCrossEntropyLoss"', [(2, 3), (2, 3)])
    x, t = _rand(2, 3).requires_grad_(), torch.rand(2, 3, dtype=torch.float64).requires_grad_()
    layer(x, t).backward()
    assert t.grad is None
    torch.testing.assert_close(x.grad, (torch.sigmoid(x) - t).detach() / 2)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge(norm):
    layer = make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [(4, 3, 1, 1), (4,)])
    x, label = _rand(4, 3, 1, 1), _labels(3, 4)
    flat = x.reshape(4, 3)
    sign = torch.ones(4, 3, dtype=torch.float64)
    sign[torch.arange(4), label.long()] = -1
    h = torch.clamp(1 + sign * flat, min=0)
    expected = (h if norm == "L1" else h * h).sum() / 4
    torch.testing.assert_close(layer(x, label), expected)
    gradcheck_layer(layer, [x, label])
    with pytest.raises(LayerError, match="one label per sample"):
        make_layer('name: "h" type: "HingeLoss"', [(4, 3), (4, 2)])


# -- Accuracy --------------------------------------------------------------------------
def test_accuracy_ties_count_against_and_per_class():
    layer = make_layer('type: "Accuracy" top: "acc" top: "per_class"', [(4, 3), (4,)])
    score = torch.tensor([[1.0, 1.0, 0.0],   # label 0 ties with class 1: wrong
                          [0.0, 2.0, 2.0],   # label 2 ties with class 1: wrong
                          [3.0, 1.0, 0.0],   # label 0 right
                          [0.0, 1.0, 0.5]])  # label 1 right
    acc, per_class = layer(score, torch.tensor([0.0, 2.0, 0.0, 1.0]))
    torch.testing.assert_close(acc, torch.tensor(0.5))
    torch.testing.assert_close(per_class, torch.tensor([0.5, 1.0, 0.0]))
    top2 = make_layer('type: "Accuracy" accuracy_param { top_k: 2 }', [(4, 3), (4,)])
    torch.testing.assert_close(top2(score, torch.tensor([0.0, 2.0, 0.0, 1.0])), torch.tensor(1.0))


def test_accuracy_axis_ignore_and_no_gradient():
    layer = make_layer('type: "Accuracy" accuracy_param { axis: 2 ignore_label: 3 }',
                       [(2, 2, 4), (2, 2)])
    score = _rand(2, 2, 4).requires_grad_()
    label = torch.tensor([[3.0, 1.0], [2.0, 3.0]])
    acc = layer(score, label)
    pred = score.argmax(2)
    expected = ((pred[0, 1] == 1).double() + (pred[1, 0] == 2).double()) / 2
    torch.testing.assert_close(acc, expected)
    assert not acc.requires_grad
    all_ignored = layer(score, torch.full((2, 2), 3.0))
    assert all_ignored.item() == 0.0  # BVLC master: 0 when nothing is counted


@pytest.mark.parametrize("params, shapes, message", [
    ("top_k: 4", [(2, 3), (2,)], "must not exceed the number of classes"),
    ("", [(2, 3, 2), (2,)], r"number of labels \(2,.*label axis 1.*values in \[0, 3\)"),
    ("axis: 2", [(2, 3), (2,)], "out of range"),
])
def test_accuracy_errors(params, shapes, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "a" type: "Accuracy" accuracy_param {{ {params} }}', shapes)
