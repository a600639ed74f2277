"""The face-recognition margin layers (docs/forks.md): happynear/caffe-windows' LabelSpecificAdd,
xialuxi/arcface-caffe's CombinedMargin and wy1iu/sphereface's MarginInnerProduct, against
float64 re-statements of the forks' loops, finite differences, one solver step through a small
net with each, and the errors for bad parameters."""

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer, sgd_solver

TYPES = {"SINGLE": 0, "DOUBLE": 1, "TRIPLE": 2, "QUADRUPLE": 3}


def add_layer(params, shapes, phase=caffe.TRAIN, tops=1):
    names = "".join(f' top: "t{i}"' for i in range(tops))
    return make_layer(f'name: "lsa" type: "LabelSpecificAdd"{names} '
                      f'label_specific_add_param {{ {params} }}', shapes, phase)


def combined_layer(params, shapes, phase=caffe.TRAIN):
    return make_layer(f'name: "cm" type: "CombinedMargin" combined_margin_param {{ {params} }}',
                      shapes, phase)


def sphere_layer(kind, n, shape, extra="", tops=2):
    names = "".join(f' top: "t{i}"' for i in range(tops))
    return make_layer(f'name: "fc6" type: "MarginInnerProduct"{names} margin_inner_product_param '
                      f'{{ num_output: {n} type: {kind} weight_filler {{ type: "xavier" }} '
                      f'{extra} }}', [shape, (shape[0],)], caffe.TRAIN)


# ---------------------------------------------------------------- LabelSpecificAdd
def add_reference(x, labels, bias):
    """The fork's loop: the label score gains the bias only where it exceeds -bias."""
    top = x.astype(np.float64).copy()
    for i, gt in enumerate(labels.astype(int)):
        if top[i, gt] > -bias:
            top[i, gt] += bias
    return top


def test_label_specific_add_forward_matches_the_fork():
    x = np.array([[0.5, 0.2, 0.1], [0.3, 0.34, 0.9], [0.7, -0.2, 0.36]], np.float32)
    labels = np.array([0, 1, 2], np.float32)
    layer = add_layer("bias: -0.35", [x.shape, labels.shape], tops=2)
    top, bias = layer(torch.from_numpy(x), torch.from_numpy(labels))
    np.testing.assert_allclose(top.numpy(), add_reference(x, labels, -0.35), rtol=1e-6)
    assert top[1, 1] == x[1, 1]          # 0.34 is not above 0.35: left alone
    assert top[0, 0] == pytest.approx(0.15) and bias.tolist() == [pytest.approx(-0.35)]


def test_label_specific_add_never_adds_at_test():
    """The fork ANDs transform_test with the TRAIN phase, then returns early at TEST."""
    x = torch.rand(3, 4)
    layer = add_layer("bias: -0.2 transform_test: true", [(3, 4), (3,)], caffe.TEST, tops=2)
    top, bias = layer(x, torch.tensor([0., 1., 2.]))
    assert torch.equal(top, x) and bias.tolist() == [0.0]


def test_label_specific_add_bias_schedule():
    params = ("bias_base: -0.1 bias_gamma: 0.5 bias_power: -1 bias_min: -0.35 bias_max: -0.05 "
              "iteration: 1")
    layer = add_layer(params, [(2, 3), (2,)], tops=2)
    x = torch.full((2, 3), 0.9)
    for it in range(1, 6):
        expected = np.clip(-0.1 + (1 + 0.5 * it) ** -1 - 1, -0.35, -0.05)
        top, bias = layer(x, torch.tensor([0., 2.]))
        assert bias.item() == pytest.approx(expected, rel=1e-6)
        assert top[1, 2].item() == pytest.approx(0.9 + expected, rel=1e-6)


def test_label_specific_add_passes_the_gradient_through():
    x = torch.tensor([[0.8, 0.1, 0.3], [0.2, 0.6, -0.4], [0.1, 0.2, 0.05]], dtype=torch.float64)
    labels = torch.tensor([0., 1., 2.])
    layer = add_layer("bias: -0.25", [x.shape, labels.shape])
    gradcheck_layer(layer, [x, labels])
    x = x.clone().requires_grad_()
    diff = torch.randn(3, 3, dtype=torch.float64)
    layer.double()(x, labels).backward(diff)
    assert torch.equal(x.grad, diff)


# ---------------------------------------------------------------- CombinedMargin
def combined_reference(x, labels, m1, m2, m3, top_diff):
    """The fork's forward and backward loops in float64 (the fork keeps acos in a float
    temporary, which its float32 build, the one that trains, computes in anyway)."""
    top, diff = x.astype(np.float64).copy(), top_diff.astype(np.float64).copy()
    for i, gt in enumerate(labels.astype(int)):
        if gt < 0:
            continue
        v = float(x[i, gt])
        angle = m1 * np.arccos(v) + m2
        top[i, gt] = np.cos(angle) - m3
        diff[i, gt] *= m1 * (1 - v * v) ** -0.5 * np.sin(angle)
    return top, diff


@pytest.mark.parametrize("m", [(1, 0.5, 0), (4, 0, 0), (1, 0, 0.35), (1.2, 0.3, 0.2)])
def test_combined_margin_matches_the_fork(m):
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.95, 0.95, (4, 5)).astype(np.float32)
    labels = np.array([3, -1, 0, 4], np.float32)
    top_diff = rng.normal(size=(4, 5))
    layer = combined_layer(f"m1: {m[0]} m2: {m[1]} m3: {m[2]}", [x.shape, labels.shape]).double()
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    top = layer(xt, torch.from_numpy(labels))
    top.backward(torch.from_numpy(top_diff))
    ref_top, ref_diff = combined_reference(x, labels, *m, top_diff)
    np.testing.assert_allclose(top.detach().numpy(), ref_top, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(xt.grad.numpy(), ref_diff, rtol=1e-6, atol=1e-9)
    assert torch.equal(top[1], xt[1])                 # a negative label leaves its row


def test_combined_margin_gradient_and_test_phase():
    x = torch.rand(3, 4, dtype=torch.float64) * 1.6 - 0.8
    labels = torch.tensor([1., 0., 3.])
    gradcheck_layer(combined_layer("m1: 2 m2: 0.2 m3: 0.1", [x.shape, labels.shape]), [x, labels])
    # the fork's forward ignores transform_test: the margin applies at TEST too
    test = combined_layer("transform_test: false", [x.shape, labels.shape], caffe.TEST)
    assert test.double()(x, labels)[0, 1] == pytest.approx(np.cos(4 * np.arccos(x[0, 1].item())
                                                                  + 0.5) - 0.35, rel=1e-6)


# ---------------------------------------------------------------- MarginInnerProduct
def psi_coefficients(kind, c, x_norm):
    """sphereface's label score factor and its (coeff_w, coeff_x), as its CPU switch."""
    s0 = np.sign(c)
    if kind == 1:
        return 2 * s0 * c * c - 1, 4 * s0 * c, -(2 * s0 * c * c + 1) / x_norm
    if kind == 2:
        s1 = np.sign(abs(c) - 0.5)
        s2 = s0 * (1 + s1) - 2
        return (s1 * (4 * c ** 3 - 3 * c) + s2, s1 * (12 * c * c - 3),
                -(8 * s1 * c ** 3 - s2) / x_norm)
    s3 = s0 * np.sign(2 * c * c - 1)
    s4 = 2 * s0 + s3 - 3
    return (s3 * (8 * c ** 4 - 8 * c * c + 1) + s4, s3 * (32 * c ** 3 - 16 * c),
            -(s3 * (24 * c ** 4 - 8 * c * c - 1) - s4) / x_norm)


def sphere_reference(x, labels, weight, lam, kind, top_diff):
    """sphereface's Forward_cpu / Backward_cpu loops in float64: (top, bottom diff, weight
    diff, the normalized weight)."""
    w = weight / np.sqrt((weight * weight).sum(1, keepdims=True))
    xw = x @ w.T
    top, bottom_diff = xw.copy(), np.zeros_like(x)
    x_norm = np.sqrt((x * x).sum(1))
    for i, gt in enumerate(labels.astype(int)):
        for j in range(w.shape[0]):
            if kind == 0 or j != gt:
                bottom_diff[i] += top_diff[i, j] / (1 + lam * (kind > 0)) * w[j]
                continue
            psi, cw, cx = psi_coefficients(kind, xw[i, j] / x_norm[i], x_norm[i])
            top[i, j] = x_norm[i] * psi
            norm = np.sqrt(cw * cw + cx * cx)
            bottom_diff[i] += top_diff[i, j] / (1 + lam) * (cw / norm * w[j] + cx / norm * x[i])
    if kind:
        top = (top + lam * xw) / (1 + lam)
        bottom_diff += lam / (1 + lam) * top_diff @ w
    return top, bottom_diff, top_diff.T @ x, w


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_margin_inner_product_matches_the_fork(kind):
    rng = np.random.default_rng(TYPES[kind])
    x, labels = rng.normal(size=(6, 4)), np.array([0, 4, 2, 2, 1, 3], np.float32)
    top_diff = rng.normal(size=(6, 5))
    layer = sphere_layer(kind, 5, (6, 4), "base: 10 gamma: 0.5 power: 2 lambda_min: 1").double()
    weight = layer.blobs[0].detach().numpy().copy()
    xt = torch.from_numpy(x).requires_grad_()
    top, lam = layer(xt, torch.from_numpy(labels))
    top.backward(torch.from_numpy(top_diff))
    assert lam.item() == pytest.approx(10 * 1.5 ** -2, rel=1e-6)  # it = 1 at the first forward
    ref_top, ref_diff, ref_wdiff, ref_w = sphere_reference(x, labels, weight, lam.item(),
                                                           TYPES[kind], top_diff)
    np.testing.assert_allclose(top.detach().numpy(), ref_top, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), ref_diff, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), ref_wdiff, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), ref_w, rtol=1e-12)  # in place


def test_margin_inner_product_lambda_schedule():
    layer = sphere_layer("DOUBLE", 3, (2, 2), "base: 1000 gamma: 0.12 power: 1 lambda_min: 5 "
                                              "iteration: 10")
    seen = [layer(torch.randn(2, 2), torch.tensor([0., 2.]))[1].item() for _ in range(3)]
    expected = [max(1000 / (1 + 0.12 * it), 5) for it in (11, 12, 13)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    late = sphere_layer("DOUBLE", 3, (2, 2), "base: 1000 gamma: 0.12 lambda_min: 5 "
                                             "iteration: 100000")
    assert late(torch.randn(2, 2), torch.tensor([0., 2.]))[1].item() == 5


def test_margin_inner_product_single_is_the_exact_gradient():
    layer = sphere_layer("SINGLE", 4, (3, 2, 2), tops=1)
    layer.blobs[0].requires_grad_(False)      # the fork's weight diff ignores normalization
    gradcheck_layer(layer, [torch.randn(3, 2, 2, dtype=torch.float64), torch.tensor([0., 3., 1.])])


@pytest.mark.parametrize("kind", ["DOUBLE", "TRIPLE", "QUADRUPLE"])
def test_margin_inner_product_diff_points_along_the_gradient(kind):
    """At lambda 0 the label score's x-diff is its gradient scaled by 1/|(coeff_w, coeff_x)|:
    the same direction as finite differences, not the same length."""
    layer = sphere_layer(kind, 3, (4, 3), "base: 0", tops=1).double()
    x = torch.tensor([[0.9, 0.2, -0.3], [-0.5, 1.1, 0.4], [0.3, -0.2, 1.4], [1.0, 1.0, 0.2]],
                     dtype=torch.float64)
    labels = torch.tensor([0., 1., 2., 0.])
    xt = x.clone().requires_grad_()
    rows = torch.arange(4)
    layer(xt, labels)[rows, labels.long()].sum().backward()
    eps, ratios = 1e-6, []
    for i in range(4):
        numeric = torch.zeros(3, dtype=torch.float64)
        for k in range(3):
            step = torch.zeros_like(x)
            step[i, k] = eps
            with torch.no_grad():
                up, down = (layer(x + s, labels)[i, int(labels[i])] for s in (step, -step))
            numeric[k] = (up - down) / (2 * eps)
        cosine = torch.dot(numeric, xt.grad[i]) / (numeric.norm() * xt.grad[i].norm())
        assert cosine.item() == pytest.approx(1, abs=1e-7)
        ratios.append((xt.grad[i].norm() / numeric.norm()).item())
    assert not np.allclose(ratios, 1, rtol=1e-3)     # the fork's diff is not the gradient


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("text, shapes, message", [
    ('type: "MarginInnerProduct" margin_inner_product_param { }', [(2, 3), (2,)],
     "num_output must be set"),
    ('type: "MarginInnerProduct" margin_inner_product_param { num_output: 3 }', [(2, 3), (2,)],
     "weight row of length 0"),
    ('type: "MarginInnerProduct" margin_inner_product_param { num_output: 3 axis: 4 '
     'weight_filler { type: "xavier" } }', [(2, 3), (2,)], "axis 4 is out of range"),
    ('type: "MarginInnerProduct" margin_inner_product_param { num_output: 3 '
     'weight_filler { type: "xavier" } }', [(2, 3), (3,)], "one label per sample"),
    ('type: "LabelSpecificAdd" label_specific_add_param { bias_base: -0.1 bias_min: -0.3 '
     'bias_max: -0.4 }', [(2, 3), (2,)], "bias_min -0.3.* > bias_max"),
    ('type: "LabelSpecificAdd"', [(2, 3), (4,)], "one label per sample"),
    ('type: "CombinedMargin"', [(2,), (2,)], "must be \\[N, classes"),
])
def test_bad_parameters_name_the_layer(text, shapes, message):
    with pytest.raises(LayerError, match=f"layer 'm'.*{message}"):
        make_layer(f'name: "m" {text}', shapes, caffe.TRAIN)


def test_labels_out_of_range_are_refused():
    with pytest.raises(LayerError, match=r"label 3 is out of range.*\[0, 3\)"):
        add_layer("bias: -0.3", [(2, 3), (2,)])(torch.rand(2, 3), torch.tensor([0., 3.]))
    with pytest.raises(LayerError, match=r"label -1 is out of range"):
        add_layer("bias: -0.3", [(2, 3), (2,)])(torch.rand(2, 3), torch.tensor([0., -1.]))
    with pytest.raises(LayerError, match=r"negative \(skipped\) or integers in \[0, 3\)"):
        combined_layer("", [(2, 3), (2,)])(torch.rand(2, 3), torch.tensor([0., 5.]))
    with pytest.raises(LayerError, match=r"label 4 is out of range"):
        sphere_layer("DOUBLE", 4, (2, 3))(torch.rand(2, 3), torch.tensor([0., 4.]))


# ---------------------------------------------------------------- one solver step
HEAD = """name: "face"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
"""
COSINE = """layer { name: "fc5" type: "InnerProduct" bottom: "data" top: "fc5"
  inner_product_param { num_output: 3 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "cos" type: "TanH" bottom: "fc5" top: "cos" }
"""
TAIL = """layer {{ name: "scale" type: "Power" bottom: "{blob}" top: "s" power_param {{ scale: 5 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }}
"""
X = np.array([[0.3, -0.8, 0.5], [1.2, 0.1, -0.4], [-0.6, 0.9, 0.7], [0.2, 0.4, -1.1]], np.float32)
LABELS = np.array([0, 2, 1, 2], np.float32)


def solver_for(tmp_path, monkeypatch, net):
    return sgd_solver(tmp_path, monkeypatch, net, data=X, label=LABELS)


def softmax_loss_diff(scores, scale):
    """Mean cross-entropy of scale·scores and its diff with respect to the scores."""
    s = scale * scores
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = np.arange(len(LABELS)), LABELS.astype(int)
    onehot = np.zeros_like(p)
    onehot[rows] = 1
    return -np.log(p[rows]).mean(), scale * (p - onehot) / len(LABELS)


@pytest.mark.parametrize("layer, margin", [
    ('type: "LabelSpecificAdd" label_specific_add_param { bias: -0.2 }',
     lambda c: torch.where(c > 0.2, c - 0.2, c)),
    ('type: "CombinedMargin" combined_margin_param { m1: 1 m2: 0.3 m3: 0.1 }',
     lambda c: torch.cos(torch.acos(c) + 0.3) - 0.1),
])
def test_one_sgd_step_through_a_cosine_margin(tmp_path, monkeypatch, layer, margin):
    """In place on the cosines, as the forks' prototxts use them; both backwards are the exact
    gradient, so float64 autograd of a plain re-statement gives the step."""
    net = (HEAD + COSINE + f'layer {{ name: "margin" {layer} bottom: "cos" bottom: "label" '
           f'top: "cos" }}\n' + TAIL.format(blob="cos"))
    solver = solver_for(tmp_path, monkeypatch, net)
    w = torch.from_numpy(solver.net.params["fc5"][0].data.astype(np.float64)).requires_grad_()
    cos = torch.tanh(torch.from_numpy(X.astype(np.float64)) @ w.t())
    at = (torch.arange(4), torch.from_numpy(LABELS).long())
    scores = cos.index_put(at, margin(cos[at]))
    loss = torch.nn.functional.cross_entropy(5 * scores, at[1])
    loss.backward()
    solver.step(1)
    assert float(solver.net.blobs["loss"].data) == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(solver.net.params["fc5"][0].data,
                               (w - 0.1 * w.grad).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_one_sgd_step_through_margin_inner_product(tmp_path, monkeypatch):
    """sphereface's A-Softmax head: the weight diff is the plain inner product's, applied to
    the rows this forward normalized; lambda counts from iteration 0."""
    net = HEAD + """layer { name: "fc6" type: "MarginInnerProduct" bottom: "data" bottom: "label"
  top: "fc6" top: "lambda" margin_inner_product_param { num_output: 3 type: QUADRUPLE
  weight_filler { type: "xavier" } base: 1000 gamma: 0.5 power: 1 lambda_min: 5 } }
""" + TAIL.format(blob="fc6").replace("scale: 5", "scale: 0.2")
    solver = solver_for(tmp_path, monkeypatch, net)
    weight = solver.net.params["fc6"][0].data.astype(np.float64).copy()
    x = X.astype(np.float64)
    top = sphere_reference(x, LABELS, weight, np.float32(1000 / 1.5), 3, np.zeros((4, 3)))[0]
    loss, diff = softmax_loss_diff(top, 0.2)
    _, _, weight_diff, normalized = sphere_reference(x, LABELS, weight, np.float32(1000 / 1.5), 3,
                                                     diff)
    solver.step(1)
    assert float(solver.net.blobs["lambda"].data[0]) == pytest.approx(1000 / 1.5, rel=1e-6)
    assert float(solver.net.blobs["loss"].data) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(solver.net.params["fc6"][0].data, normalized - 0.1 * weight_diff,
                               rtol=1e-5, atol=1e-6)
    solver.step(1)
    assert float(solver.net.blobs["lambda"].data[0]) == pytest.approx(500, rel=1e-6)
