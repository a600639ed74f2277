"""xialuxi/arcface-caffe's CosinAddm and the forks' softmax FocalLoss (docs/forks.md), against
float64 re-statements of the forks' CPU loops, finite differences, one solver step through
arcface-caffe's head (margin, scale, focal loss) and the errors for what is refused."""

import math

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from caffe_compat.formats.errors import CaffeCompatError
from layer_utils import gradcheck_layer, make_layer, sgd_solver

FLT_MIN = np.float64(np.finfo(np.float32).tiny)


def cosin_layer(params, shapes, phase=caffe.TRAIN):
    return make_layer(f'name: "arc" type: "CosinAddm" cosin_add_m_param {{ {params} }}',
                      shapes, phase)


def focal_layer(params, shapes, loss="", tops=1):
    names = "".join(f' top: "t{i}"' for i in range(tops))
    return make_layer(f'name: "fl" type: "FocalLoss"{names} focal_loss_param {{ {params} }} '
                      f'loss_param {{ {loss} }}', shapes, caffe.TRAIN)


# ---------------------------------------------------------------- CosinAddm
def cosin_reference(x, labels, m, top_diff):
    """cosin_add_m_layer.cpp's Forward_cpu and Backward_cpu, sample by sample."""
    top, bottom_diff = x.copy(), top_diff.copy()
    threshold = math.cos(math.pi - m)
    for i, gt in enumerate(labels.astype(int)):
        c = x[i, gt]
        if c > 1:
            c = 1.0
        if c <= threshold:
            top[i, gt], flagged = c - math.sin(math.pi - m) * m, True
        else:
            top[i, gt], flagged = c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m), False
        sin_theta = math.sqrt(1 - (1.0 if c == 1 else c * c))
        coeff = 1.0 if sin_theta == 0 or flagged else math.cos(m) + math.sin(m) * c / sin_theta
        bottom_diff[i, gt] = coeff * top_diff[i, gt]
    return top, bottom_diff


@pytest.mark.parametrize("m", [0.5, 0.3, 1.2])
def test_cosin_add_m_matches_the_fork(m):
    """Rows on the arc, on the linear fall-back (x ≤ cos(π - m)), above 1 and at 1."""
    x = np.array([[0.7, 0.2, -0.1], [0.3, -0.95, 0.5], [1.02, 0.4, 0.0], [0.1, 1.0, -0.3],
                  [-0.5, 0.6, -0.999]], np.float64)
    labels = np.array([0, 1, 0, 1, 2], np.float64)
    top_diff = np.random.default_rng(0).normal(size=x.shape)
    layer = cosin_layer(f"m: {m}", [x.shape, labels.shape]).double()
    xt = torch.from_numpy(x).requires_grad_()
    top = layer(xt, torch.from_numpy(labels))
    top.backward(torch.from_numpy(top_diff))
    m32 = float(np.float32(m))              # the proto's float, as the fork reads it
    ref_top, ref_diff = cosin_reference(x, labels, m32, top_diff)
    np.testing.assert_allclose(top.detach().numpy(), ref_top, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(xt.grad.numpy(), ref_diff, rtol=1e-12, atol=1e-14)
    assert top[0, 0].item() == pytest.approx(math.cos(math.acos(0.7) + m32))  # ArcFace's margin
    assert top[2, 0].item() == pytest.approx(math.cos(m32))                  # 1.02 clamped


def test_cosin_add_m_default_and_gradient():
    """m defaults to 0.5; away from the clamp its diff is the exact gradient of the piecewise
    margin (cos(θ + m), then x - m·sin m past π - m), checked by finite differences."""
    x = torch.tensor([[0.8, 0.1, -0.2, 0.3], [-0.4, 0.5, 0.2, 0.9], [0.2, -0.93, 0.6, 0.1]],
                     dtype=torch.float64)
    labels = torch.tensor([0., 3., 1.])
    layer = cosin_layer("", [x.shape, labels.shape])
    assert layer.m == 0.5
    gradcheck_layer(layer, [x, labels])
    top = layer.double()(x, labels)
    assert top[2, 1].item() == pytest.approx(-0.93 - 0.5 * math.sin(0.5))   # linear branch


def test_cosin_add_m_applies_in_both_phases():
    """The CPU build never reads transform_test or the phase."""
    x, labels = torch.tensor([[0.6, 0.3], [0.2, 0.9]]), torch.tensor([0., 1.])
    train = cosin_layer("m: 0.4", [(2, 2), (2,)])(x, labels)
    test = cosin_layer("m: 0.4 transform_test: false", [(2, 2), (2,)], caffe.TEST)(x, labels)
    assert torch.equal(train, test) and not torch.equal(test, x)


# ---------------------------------------------------------------- FocalLoss
def softmax(score):
    e = np.exp(score - score.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def normalizer(mode, outer, inner, count):
    return max(1.0, {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer,
                     "NONE": 1}[mode])


def focal_zimenglan(score, labels, alpha, gamma, ignore, mode):
    """zimenglan-sysu-512/Focal-Loss' focal_loss_layer.cpp: loss and bottom diff (top diff 1)
    for a score [outer, C, inner]."""
    outer, channels, inner = score.shape
    prob = softmax(score)
    log_prob = np.log(np.maximum(prob, FLT_MIN))
    power = alpha * (1 - prob) ** gamma
    loss, count, diff = 0.0, 0, np.zeros_like(score)
    for i in range(outer):
        for j in range(inner):
            gt = int(labels[i, j])
            if ignore is not None and gt == ignore:
                continue
            loss -= power[i, gt, j] * log_prob[i, gt, j]
            p = prob[i, gt, j]
            grad = (-gamma * (power[i, gt, j] / max(1 - p, 1e-10)) * log_prob[i, gt, j] * p
                    + power[i, gt, j])
            for c in range(channels):
                diff[i, c, j] = grad * (p - 1) if c == gt else grad * prob[i, c, j]
            count += 1
    norm = normalizer(mode, outer, inner, count)
    return loss / norm, diff / norm


def focal_chuanqi_diff(score, labels, alpha, gamma, ignore, mode):
    """chuanqi305/FocalLoss' Backward_cpu, written with (1 - p_t)^(gamma - 1): the same diff."""
    outer, channels, inner = score.shape
    prob = softmax(score)
    diff, count = np.zeros_like(score), 0
    for i in range(outer):
        for j in range(inner):
            gt = int(labels[i, j])
            if ignore is not None and gt == ignore:
                continue
            pt = prob[i, gt, j]
            log_pt = math.log(max(pt, FLT_MIN))
            for c in range(channels):
                pc = prob[i, c, j]
                if c == gt:
                    diff[i, c, j] = alpha * (1 - pt) ** gamma * (gamma * pt * log_pt + pt - 1)
                else:
                    diff[i, c, j] = alpha * ((1 - pt) ** (gamma - 1) * (-gamma * log_pt * pt * pc)
                                             + (1 - pt) ** gamma * pc)
            count += 1
    return diff / normalizer(mode, outer, inner, count)


@pytest.mark.parametrize("loss, mode, ignore", [
    ("", "VALID", None), ("ignore_label: 2", "VALID", 2), ("normalization: FULL ignore_label: 0",
                                                          "FULL", 0),
    ("normalize: false", "BATCH_SIZE", None), ("normalization: NONE ignore_label: 1", "NONE", 1),
])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (1.0, 0.5), (0.7, 0.0)])
def test_focal_loss_matches_both_forks(loss, mode, ignore, alpha, gamma):
    rng = np.random.default_rng(int(gamma * 10 + alpha * 100))
    score = rng.normal(scale=2, size=(2, 3, 2, 2))
    labels = rng.integers(0, 3, size=(2, 1, 2, 2)).astype(np.float64)
    labels[0, 0, 0, 0] = 2
    layer = focal_layer(f"alpha: {alpha} gamma: {gamma}", [score.shape, labels.shape], loss)
    st = torch.from_numpy(score).requires_grad_()
    out = layer.double()(st, torch.from_numpy(labels))
    out.backward()
    alpha32, gamma32 = (float(np.float32(v)) for v in (alpha, gamma))   # the proto's floats
    args = (score.reshape(2, 3, 4), labels.reshape(2, 4), alpha32, gamma32, ignore, mode)
    ref_loss, ref_diff = focal_zimenglan(*args)
    assert out.item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(st.grad.numpy().reshape(2, 3, 4), ref_diff, rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(focal_chuanqi_diff(*args), ref_diff, rtol=1e-10, atol=1e-14)


def test_focal_loss_gradient_and_softmax_limit():
    """The diff is the gradient (finite differences); alpha 1, gamma 0 is SoftmaxWithLoss."""
    score = torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0., 4., 2., 2.])
    gradcheck_layer(focal_layer("alpha: 0.5 gamma: 1.5", [(4, 5), (4,)]), [score, labels])
    gradcheck_layer(focal_layer("", [(4, 5), (4,)], "ignore_label: 2"), [score, labels])
    plain = focal_layer("alpha: 1 gamma: 0", [(4, 5), (4,)]).double()(score, labels)
    expected = torch.nn.functional.cross_entropy(score, labels.long())
    assert plain.item() == pytest.approx(expected.item(), rel=1e-12)


def test_focal_loss_defaults_prob_top_and_axis():
    layer = focal_layer("", [(2, 3), (2,)], tops=2)
    assert (layer.alpha, layer.gamma) == (0.25, 2.0)
    score, labels = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0., 1.])
    loss, prob = layer(score, labels)
    torch.testing.assert_close(prob, torch.softmax(score, 1))
    p = prob[torch.arange(2), labels.long()].double()
    assert loss.item() == pytest.approx((-0.25 * (1 - p) ** 2 * p.log()).mean().item(), rel=1e-6)
    last = make_layer('name: "fl" type: "FocalLoss" softmax_param { axis: -1 }',
                      [(2, 4, 3), (2, 4)], caffe.TRAIN)
    moved = last(score.repeat(4, 1).reshape(2, 4, 3), labels.repeat(4).reshape(2, 4))
    assert moved.item() == pytest.approx(loss.item(), rel=1e-6)


def test_focal_loss_confident_wrong_label_is_clamped():
    """p_t below FLT_MIN: the loss takes log(FLT_MIN), as the fork's max(p, FLT_MIN)."""
    layer = focal_layer("alpha: 1 gamma: 2", [(1, 2), (1,)], "normalization: NONE")
    out = layer(torch.tensor([[0.0, 200.0]]), torch.tensor([0.]))
    assert out.item() == pytest.approx(-math.log(FLT_MIN), rel=1e-6)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("text, message", [
    ('type: "FocalLoss" focal_loss_param { type: LINEAR }', "LINEAR is declared by the fork"),
    ('type: "FocalLoss" focal_loss_param { gamma: -1 }', "gamma must be >= 0, got -1"),
    ('type: "FocalLoss" focal_loss_param { alpha: 0 }', "alpha must be > 0, got 0"),
    ('type: "FocalLoss" loss_param { normalization: PRE_FIXED }', "PRE_FIXED is only read"),
    ('type: "CosinAddm"', "one label per sample"),
])
def test_bad_parameters_name_the_layer(text, message):
    shapes = [(2, 3), (3,)] if "CosinAddm" in text else [(2, 3), (2,)]
    with pytest.raises(LayerError, match=f"layer 'm'.*{message}"):
        make_layer(f'name: "m" {text}', shapes, caffe.TRAIN)


def test_labels_out_of_range_are_refused():
    with pytest.raises(LayerError, match=r"label 3 is out of range.*\[0, 3\)"):
        cosin_layer("", [(2, 3), (2,)])(torch.rand(2, 3), torch.tensor([0., 3.]))
    with pytest.raises(LayerError, match=r"label -1 is out of range"):
        cosin_layer("", [(2, 3), (2,)])(torch.rand(2, 3), torch.tensor([0., -1.]))
    with pytest.raises(LayerError, match=r"label 5 is out of range"):
        focal_layer("", [(2, 3), (2,)])(torch.rand(2, 3), torch.tensor([0., 5.]))


@pytest.mark.parametrize("field, fork", [
    ("axis: 1", "chuanqi305/FocalLoss"), ("engine: CAFFE", "chuanqi305/FocalLoss"),
    ("alpha_balance: true", "owphoo/FocalLoss"),
])
def test_other_forks_focal_fields_are_named(tmp_path, field, fork):
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "data" type: "Input" top: "s" top: "l" input_param { shape { '
                    'dim: 2 dim: 3 } shape { dim: 2 } } }\nlayer { name: "focal" type: '
                    f'"FocalLoss" bottom: "s" bottom: "l" top: "loss" focal_loss_param {{ {field} '
                    '} }\n')
    with pytest.raises(CaffeCompatError, match=f"layer 'focal'.*{fork}"):
        caffe.Net(str(path), caffe.TRAIN)


# ---------------------------------------------------------------- one solver step
NET = """name: "arcface"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "fc5" type: "InnerProduct" bottom: "data" top: "fc5"
  inner_product_param { num_output: 3 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "cos" type: "TanH" bottom: "fc5" top: "fc6" }
layer { name: "cosin_add_m" type: "CosinAddm" bottom: "fc6" bottom: "label" top: "fc6_margin"
  cosin_add_m_param { m: 0.3 } }
layer { name: "scale" type: "Power" bottom: "fc6_margin" top: "s" power_param { scale: 4 } }
layer { name: "focal_loss" type: "FocalLoss" bottom: "s" bottom: "label" top: "loss"
  focal_loss_param:{ type: ORIGIN gamma: 2 alpha: 0.25 beta: 1 } }   # the fork's spelling
"""
X = np.array([[0.3, -0.8, 0.5], [1.2, 0.1, -0.4], [-0.6, 0.9, 0.7], [0.2, 0.4, -1.1]], np.float32)
LABELS = np.array([0, 2, 1, 2], np.float32)


def test_one_sgd_step_through_arcface_caffes_head(tmp_path, monkeypatch):
    """cosin_add_m.prototxt's head (margin, scale, focal loss) on tanh cosines: away from the
    clamps both backwards are the exact gradient, so float64 autograd of the formulas gives the
    step."""
    solver = sgd_solver(tmp_path, monkeypatch, NET, data=X, label=LABELS)
    w = torch.from_numpy(solver.net.params["fc5"][0].data.astype(np.float64)).requires_grad_()
    cos = torch.tanh(torch.from_numpy(X.astype(np.float64)) @ w.t())
    at = (torch.arange(4), torch.from_numpy(LABELS).long())
    assert bool((cos[at] > math.cos(math.pi - 0.3)).all())     # all on the arc
    scores = cos.index_put(at, torch.cos(torch.acos(cos[at]) + 0.3))
    p_t = torch.softmax(4 * scores, 1)[at]
    loss = (-0.25 * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    loss.backward()
    solver.step(1)
    assert float(solver.net.blobs["loss"].data) == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(solver.net.params["fc5"][0].data,
                               (w - 0.1 * w.grad).detach().numpy(), rtol=1e-5, atol=1e-6)
