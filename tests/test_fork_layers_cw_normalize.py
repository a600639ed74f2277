"""happynear/caffe-windows' weight-normalized InnerProduct (``inner_product_param { normalize:
true }``) and its parameter-free ``Normalize`` (``normalize_param``), dispatched against SSD's
``Normalize`` by the parameter a layer sets (docs/forks.md): float64 re-statements of the
fork's loops, finite differences, and one solver step through an AM-Softmax-shaped net."""
import logging

import numpy as np
import pytest
import torch

from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer, sgd_solver


def cw_normalize(params="", shape=(3, 4), tops=1):
    names = "".join(f' top: "t{i}"' for i in range(tops))
    return make_layer(f'name: "norm1" type: "Normalize"{names} normalize_param {{ {params} }}',
                      [shape])


# ---------------------------------------------------------------- the fork's loops, float64
def fork_forward(x, kind):
    """normalize_layer.cu's forward: per (n, s) the norm over channels (L2 with 1e-12 inside
    the root, L1 plus 1e-6), then x / norm; the top is [num, channels, height, width]."""
    shape = tuple(x.shape) + (1,) * (4 - x.ndim)
    n, c, h, w = shape
    data = x.astype(np.float64).reshape(n, c, h * w)
    top, norm = np.zeros_like(data), np.zeros((n, 1, h * w))
    for i in range(n):
        for s in range(h * w):
            if kind == "L2":
                norm[i, 0, s] = np.sqrt(sum(data[i, ch, s] ** 2 for ch in range(c)) + 1e-12)
            else:
                norm[i, 0, s] = sum(abs(data[i, ch, s]) for ch in range(c)) + 1e-6
            for ch in range(c):
                top[i, ch, s] = data[i, ch, s] / norm[i, 0, s]
    return top.reshape(shape), norm.reshape(n, 1, h, w)


def fork_backward(x, top, norm, top_diff, kind, fix_gradient=False, norm_diff=None):
    """normalize_layer.cu's backward: a = Σ_c top·top_diff, diff = top_diff - t·a with t the
    top (L2) or sign(x) (L1), divided by the norm unless fix_gradient; bp_norm adds
    norm_diff·t."""
    n, c, h, w = top.shape
    x = x.astype(np.float64).reshape(n, c, h * w)
    y, dy, nm = top.reshape(n, c, h * w), top_diff.reshape(n, c, h * w), norm.reshape(n, h * w)
    diff = np.zeros_like(y)
    for i in range(n):
        for s in range(h * w):
            a = sum(y[i, ch, s] * dy[i, ch, s] for ch in range(c))
            for ch in range(c):
                t = y[i, ch, s] if kind == "L2" else np.sign(x[i, ch, s])
                diff[i, ch, s] = dy[i, ch, s] - t * a
                if not fix_gradient:
                    diff[i, ch, s] /= nm[i, s]
                if norm_diff is not None:
                    diff[i, ch, s] += norm_diff.reshape(n, h * w)[i, s] * t
    return diff


def run_backward(layer, x, top_diff, norm_diff=None):
    x = torch.from_numpy(x).double().requires_grad_()
    outs = layer.double()(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diffs = [torch.from_numpy(top_diff)] + ([torch.from_numpy(norm_diff)] if len(outs) > 1 else [])
    torch.autograd.backward(outs, diffs)
    return [o.detach().numpy() for o in outs], x.grad.numpy()


RNG = np.random.default_rng(7)
X4 = RNG.normal(size=(2, 3, 2, 2))


@pytest.mark.parametrize("kind", ["L2", "L1"])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 2, 2)])
def test_forward_and_backward_match_the_fork(kind, shape):
    x = RNG.normal(size=shape)
    top, norm = fork_forward(x, kind)
    dy = RNG.normal(size=top.shape)
    (out,), grad = run_backward(cw_normalize(f'normalize_type: "{kind}"', shape), x, dy)
    assert out.shape == top.shape and len(out.shape) == 4        # [N, C] -> [N, C, 1, 1]
    np.testing.assert_allclose(out, top, rtol=1e-12)
    np.testing.assert_allclose(grad.reshape(top.shape),
                               fork_backward(x, top, norm, dy, kind).reshape(top.shape),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["L2", "L1"])
def test_norm_top_bp_norm_and_fix_gradient(kind):
    top, norm = fork_forward(X4, kind)
    dy, dn = RNG.normal(size=top.shape), RNG.normal(size=norm.shape)
    # two tops with bp_norm: the norm's diff flows back
    (out, out_norm), grad = run_backward(cw_normalize(f'normalize_type: "{kind}" bp_norm: true',
                                                      X4.shape, tops=2), X4, dy, dn)
    np.testing.assert_allclose(out_norm, norm, rtol=1e-12)
    np.testing.assert_allclose(grad.reshape(-1), fork_backward(X4, top, norm, dy, kind,
                                                               norm_diff=dn).reshape(-1),
                               rtol=1e-10, atol=1e-12)
    # two tops without bp_norm: the norm's diff is dropped, as the fork's
    _, grad = run_backward(cw_normalize(f'normalize_type: "{kind}"', X4.shape, tops=2),
                           X4, dy, dn)
    np.testing.assert_allclose(grad.reshape(-1), fork_backward(X4, top, norm, dy, kind)
                               .reshape(-1), rtol=1e-10, atol=1e-12)
    # fix_gradient (read by the fork's CUDA backward): no division by the norm
    _, grad = run_backward(cw_normalize(f'normalize_type: "{kind}" fix_gradient: true',
                                        X4.shape), X4, dy)
    np.testing.assert_allclose(grad.reshape(-1), fork_backward(X4, top, norm, dy, kind, True)
                               .reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("params, tops", [
    ('normalize_type: "L2"', 1), ('normalize_type: "L1"', 1), ('bp_norm: true', 2),
    ('normalize_type: "L1" bp_norm: true', 2)])
def test_backward_is_the_exact_gradient(params, tops):
    """Without fix_gradient the fork's backward is the gradient (of both tops with bp_norm);
    L1 is checked away from 0, where |x| has no derivative."""
    x = torch.from_numpy(X4 + np.sign(X4) * 0.1)
    gradcheck_layer(cw_normalize(params, X4.shape, tops), [x])


def test_the_parameter_message_picks_the_fork(caplog):
    """norm_param: SSD's (a scale blob); normalize_param: caffe-windows' (no blob); neither:
    SSD's, as before, with one warning naming the layer (AM-Softmax's published prototxt
    writes a bare Normalize)."""
    with caplog.at_level(logging.WARNING):
        ssd = make_layer('name: "n" type: "Normalize" norm_param { across_spatial: false }',
                         [(2, 3, 2, 2)])
        windows = cw_normalize("", (2, 3))
    assert len(ssd.blobs) == 1 and len(windows.blobs) == 0 and not caplog.records
    with caplog.at_level(logging.WARNING):
        bare = make_layer('name: "norm1" type: "Normalize"', [(2, 3)])
    assert len(bare.blobs) == 1                          # SSD's learnable scale
    assert len(caplog.records) == 1
    assert "'norm1'" in caplog.text and "normalize_param" in caplog.text
    x = torch.rand(2, 3)
    np.testing.assert_allclose(bare(x).detach().numpy(),
                               (x / torch.sqrt(x.square().sum(1, keepdim=True) + 1e-10)).numpy(),
                               rtol=1e-6)                 # SSD's, shape kept [2, 3]


@pytest.mark.parametrize("layer, shapes, match", [
    ('normalize_param { } norm_param { }', [(2, 3)], "one fork's or the other's"),
    ('normalize_param { normalize_type: "L3" }', [(2, 3)], '"L2" and "L1" only'),
    ('normalize_param { }', [(1, 2, 3, 4, 5)], "at most 4 axes"),
    ('norm_param { } top: "a"', [(2, 3)], "the norm top is caffe-windows'"),
])
def test_bad_normalize_layers_are_named(layer, shapes, match):
    with pytest.raises(LayerError, match=match) as info:
        make_layer(f'name: "bad" type: "Normalize" top: "t" {layer}', shapes)
    assert "'bad'" in str(info.value)


# ---------------------------------------------------------------- InnerProduct normalize
def ip_layer(extra="", shape=(3, 4), n=5):
    return make_layer(f'name: "fc6" type: "InnerProduct" inner_product_param {{ num_output: {n} '
                      f'normalize: true bias_term: false weight_filler {{ type: "gaussian" '
                      f'std: 2 }} {extra} }}', [shape])


def test_inner_product_normalize_rescales_the_stored_rows_then_multiplies():
    layer = ip_layer().double()
    raw = layer.blobs[0].detach().numpy().copy()
    x = RNG.normal(size=(3, 4))
    xt = torch.from_numpy(x).requires_grad_()
    y = layer(xt)
    unit = raw / np.sqrt((raw ** 2).sum(1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), unit, rtol=1e-12)  # in place
    np.testing.assert_allclose(y.detach().numpy(), x @ unit.T, rtol=1e-12)
    dy = RNG.normal(size=(3, 5))
    y.backward(torch.from_numpy(dy))
    # the fork's backward: the plain product's, with the unit rows (no gradient through the
    # scaling)
    np.testing.assert_allclose(layer.blobs[0].grad.numpy(), dy.T @ x, rtol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), dy @ unit, rtol=1e-12)


def test_inner_product_normalize_input_gradient_by_finite_differences():
    """Once the rows are unit, rescaling them again changes nothing (to 1e-12), so the bottom's
    diff is the gradient."""
    layer = ip_layer().double()
    x = torch.from_numpy(RNG.normal(size=(3, 4))).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-8)


def test_inner_product_normalize_two_forwards_then_backward():
    """pycaffe may run forward twice before backward: the second in-place rescaling must not
    spoil the first forward's saved weights."""
    layer = ip_layer().double()
    x = torch.from_numpy(RNG.normal(size=(3, 4))).requires_grad_()
    first = layer(x)
    layer(x)
    first.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), layer.blobs[0].detach().numpy().sum(0)[None]
                               .repeat(3, 0), rtol=1e-10)


def test_inner_product_normalize_offers_no_folded_or_cached_form():
    layer, plain = ip_layer(), make_layer('name: "p" type: "InnerProduct" '
                                          'inner_product_param { num_output: 5 }', [(3, 4)])
    assert layer.specialized([(3, 4)]) is None and layer.linear_channels((3, 5)) is None
    assert not layer.flattened_linear() and not layer.traceable and not layer.exports_to_onnx
    assert plain.specialized([(3, 4)]) is not None and plain.linear_channels((3, 5)) == 5


def test_inner_product_normalize_with_transpose_is_refused():
    with pytest.raises(LayerError, match=r"'fc6'.*normalize with transpose"):
        ip_layer("transpose: true")


# ---------------------------------------------------------------- AM-Softmax's train net
AM_NET = """name: "am"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 1 dim: 3 dim: 3 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 2 kernel_size: 2 weight_filler { type: "gaussian" std: 0.5 }
  bias_filler { type: "constant" value: 0.1 } } }
layer { name: "fc5" type: "InnerProduct" bottom: "conv1" top: "fc5"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "norm1" type: "Normalize" bottom: "fc5" top: "norm1" normalize_param { } }
layer { name: "fc6_l2" type: "InnerProduct" bottom: "norm1" top: "fc6" param { lr_mult: 1 }
  inner_product_param { num_output: 3 normalize: true bias_term: false
  weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "margin" type: "LabelSpecificAdd" bottom: "fc6" bottom: "label" top: "fc6_margin"
  label_specific_add_param { bias: -0.35 } }
layer { name: "scale" type: "Scale" bottom: "fc6_margin" top: "fc6_margin_scale"
  param { lr_mult: 0 decay_mult: 0 } scale_param { filler { type: "constant" value: 30 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc6_margin_scale" bottom: "label"
  top: "loss" }
"""


def test_one_sgd_step_through_am_softmax(tmp_path, monkeypatch):
    """The step by hand in float64: fc6's rows are made unit first and get the plain
    gradient; Normalize's and the margin's backwards are exact, so autograd of a plain
    re-statement with the unit rows as leaves gives every diff."""
    data, labels = RNG.normal(size=(4, 1, 3, 3)), np.array([0, 2, 1, 2])
    solver = sgd_solver(tmp_path, monkeypatch, AM_NET, data=data, label=labels)
    p = {k: [torch.from_numpy(b.data.astype(np.float64)).requires_grad_() for b in v]
         for k, v in solver.net.params.items()}
    raw6 = p["fc6_l2"][0].detach()
    unit6 = (raw6 / torch.sqrt(raw6.square().sum(1, keepdim=True) + 1e-12)).requires_grad_()
    conv = torch.nn.functional.conv2d(torch.from_numpy(data), p["conv1"][0], p["conv1"][1])
    fc5 = conv.reshape(4, -1) @ p["fc5"][0].t() + p["fc5"][1]
    cos = (fc5 / torch.sqrt(fc5.square().sum(1, keepdim=True) + 1e-12)) @ unit6.t()
    at = (torch.arange(4), torch.from_numpy(labels))
    margin = cos.index_put(at, torch.where(cos[at] > 0.35, cos[at] - 0.35, cos[at]))
    loss = torch.nn.functional.cross_entropy(30 * margin, at[1])
    loss.backward()
    solver.step(1)
    assert float(solver.net.blobs["loss"].data) == pytest.approx(loss.item(), rel=1e-5)
    assert solver.net.blobs["norm1"].data.shape == (4, 4, 1, 1)
    np.testing.assert_allclose(solver.net.params["fc6_l2"][0].data,
                               (unit6 - 0.1 * unit6.grad).detach().numpy(), rtol=1e-5, atol=1e-6)
    for name in ("conv1", "fc5"):
        for blob, ref in zip(solver.net.params[name], p[name]):
            np.testing.assert_allclose(blob.data, (ref - 0.1 * ref.grad).detach().numpy(),
                                       rtol=1e-5, atol=1e-6)
    assert float(solver.net.params["scale"][0].data[0]) == 30           # lr_mult 0


def test_colorization_loss_is_named_as_missing():
    """richzhang/colorization's train_val_v2.prototxt uses SoftmaxCrossEntropyLoss from its
    Caffe fork, whose source was not available: refused naming the fork, not implemented."""
    with pytest.raises(LayerError, match=r"SoftmaxCrossEntropyLoss \(defined by richzhang"):
        make_layer('name: "loss8_313" type: "SoftmaxCrossEntropyLoss"', [(2, 3), (2, 3)])
