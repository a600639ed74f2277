"""Neuron layers: Caffe goldens, float64 gradient checks, Caffe's edge cases, parameter errors."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

import caffe_compat.engine.layers.neuron  # noqa: F401  (registers the layers)
from caffe_compat.engine.layers import TEST, TRAIN, LayerError
from layer_utils import BWD, FWD, Golden, gradcheck_layer, make_layer



def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


# -- goldens -------------------------------------------------------------------------
def test_golden_neurons():
    g = Golden("neurons")
    x = _leaf(g.t("in/data"))
    total = 0
    for name in ["lrelu", "sig", "tanh", "pow", "drop", "absval"]:
        top = g.layers[name].top[0]
        y = g.layer(name, x)(x)
        torch.testing.assert_close(y, g.t(f"blob/{top}"), **FWD, msg=name)
        total = total + (y * g.t(f"top_diff/{top}")).sum()
    total.backward()  # the split fan-out sums the six layers' gradients into data
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)


def test_golden_elu_bnll_exp_log():
    g = Golden("elu_bnll_exp_log")
    x = _leaf(g.t("in/data"))
    outs = {name: g.layer(name, x)(x) for name in ["elu", "bnll", "exp", "absx"]}
    outs["log"] = g.layer("log", outs["absx"])(outs["absx"])
    for name, y in outs.items():
        torch.testing.assert_close(y, g.t(f"blob/{g.layers[name].top[0]}"), **FWD, msg=name)
    total = sum((outs[n] * g.t(f"top_diff/{n}")).sum() for n in ["elu", "bnll", "exp", "log"])
    total.backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)


def test_golden_prelu_channel_shared():
    g = Golden("prelu_channel_shared")
    x = _leaf(g.t("in/data"))
    total = 0
    for name, top in [("prelu", "p1"), ("prelu_s", "p2")]:
        layer = g.layer(name, x)
        assert tuple(layer.blobs[0].shape) == g.data[f"param/{name}/0"].shape
        y = layer(x)
        torch.testing.assert_close(y, g.t(f"blob/{top}"), **FWD)
        (y * g.t(f"top_diff/{top}")).sum().backward(retain_graph=True)
        torch.testing.assert_close(layer.blobs[0].grad, g.t(f"param_diff/{name}/0"), **BWD)
        total = total + (y * g.t(f"top_diff/{top}")).sum()
    x.grad = None
    total.backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)


def test_golden_dropout_train_ratio_zero_is_identity():
    g = Golden("dropout_train_scale")
    assert g.phase == TRAIN
    x = _leaf(g.t("in/data"))
    y = g.layer("drop", x)(x)
    torch.testing.assert_close(y, g.t("blob/out"), rtol=0, atol=0)
    (y * g.t("top_diff/out")).sum().backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), rtol=0, atol=0)


def test_golden_inplace_chain():
    """conv -> in-place ReLU -> in-place Dropout (TEST) -> max pool, conv/pool done in torch."""
    g = Golden("inplace_chain")
    x = _leaf(g.t("in/data"))
    w, b = _leaf(g.t("param/conv/0")), _leaf(g.t("param/conv/1"))
    conv = F.conv2d(x, w, b)
    conv_before = conv.detach().clone()
    relu_out = g.layer("relu", conv)(conv)
    drop_out = g.layer("drop", relu_out)(relu_out)
    out = F.max_pool2d(drop_out, 2, 2)
    # The builder rebinds names for in-place tops: the layers must leave their bottom alone.
    torch.testing.assert_close(conv.detach(), conv_before, rtol=0, atol=0)
    torch.testing.assert_close(drop_out, g.t("blob/conv"), **FWD)
    torch.testing.assert_close(out, g.t("blob/out"), **FWD)
    (out * g.t("top_diff/out")).sum().backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)
    torch.testing.assert_close(w.grad, g.t("param_diff/conv/0"), **BWD)
    torch.testing.assert_close(b.grad, g.t("param_diff/conv/1"), **BWD)


# -- gradient checks -----------------------------------------------------------------
GRADCHECK_CASES = [
    'type: "ReLU"',
    'type: "ReLU" relu_param { negative_slope: 0.1 }',
    'type: "ReLU" relu_param { negative_slope: -0.3 }',
    'type: "PReLU"',
    'type: "PReLU" prelu_param { channel_shared: true filler { type: "gaussian" std: 0.3 } }',
    'type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }',
    'type: "Sigmoid"',
    'type: "TanH"',
    'type: "AbsVal"',
    'type: "Power" power_param { power: 2 scale: 0.5 shift: 1.5 }',
    'type: "Power" power_param { power: 3 scale: -2 }',
    'type: "Power" power_param { power: 1 scale: 2.5 shift: -1 }',
    'type: "Power" power_param { power: 0.5 scale: 0.5 shift: 4 }',
    'type: "Power" power_param { power: 0 scale: 3 shift: 2 }',
    'type: "Exp"',
    'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }',
    'type: "Exp" exp_param { base: -1 scale: -0.7 shift: 0.3 }',
    'type: "Log" log_param { scale: 0.5 shift: 5 }',
    'type: "Log" log_param { base: 10 scale: 2 shift: 5 }',
    'type: "BNLL"',
    'type: "ELU"',
    'type: "ELU" elu_param { alpha: 0.7 }',
    'type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
    'type: "Clip" clip_param { min: -0.5 max: 0.7 }',
    'type: "Swish"',
    'type: "Swish" swish_param { beta: 1.7 }',
]


@pytest.mark.parametrize("phase", [TRAIN, TEST])
@pytest.mark.parametrize("text", GRADCHECK_CASES)
def test_gradcheck(text, phase):
    if "Dropout" in text and phase == TRAIN:
        pytest.skip("random mask: covered by test_dropout_train_statistics")
    torch.manual_seed(0)
    shape = (2, 3, 2, 3)
    x = torch.randn(shape, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, x + 1e-2, x)  # keep finite differences off the kinks
    layer = make_layer(f'name: "n" {text}', [shape], phase)
    gradcheck_layer(layer, [x])


def test_dropout_train_statistics_and_gradient():
    torch.manual_seed(0)
    layer = make_layer('name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
                       [(200, 500)], TRAIN)
    x = torch.rand(200, 500) + 1.0
    x.requires_grad_(True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], x.detach()[kept] / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    # TEST phase is the identity.
    test_layer = make_layer('name: "d" type: "Dropout"', [(2, 3)], TEST)
    x2 = torch.randn(2, 3)
    torch.testing.assert_close(test_layer(x2), x2, rtol=0, atol=0)


# -- Caffe's exact gradients at the kinks ------------------------------------------------
def _grad(text: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer = make_layer(f'name: "n" {text}', [tuple(x.shape)])
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    return y.detach(), x.grad


X0 = torch.tensor([[-2.0, 0.0, 3.0]])


@pytest.mark.parametrize("text,y_exp,g_exp", [
    ('type: "ReLU"', [0.0, 0.0, 3.0], [0.0, 0.0, 1.0]),
    # Caffe: dy * ((x > 0) + slope * (x <= 0)), so x == 0 takes the slope.
    ('type: "ReLU" relu_param { negative_slope: 0.1 }', [-0.2, 0.0, 3.0], [0.1, 0.1, 1.0]),
    ('type: "AbsVal"', [2.0, 0.0, 3.0], [-1.0, 0.0, 1.0]),
    ('type: "ELU" elu_param { alpha: 0.5 }', [0.5 * (np.exp(-2) - 1), 0.0, 3.0],
     [0.5 * np.exp(-2), 0.5, 1.0]),
    ('type: "Clip" clip_param { min: 0 max: 3 }', [0.0, 0.0, 3.0], [0.0, 1.0, 1.0]),
    ('type: "Threshold" threshold_param { threshold: 0 }', [0.0, 0.0, 1.0], None),
    ('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', [9.0, 9.0, 9.0], [0.0, 0.0, 0.0]),
    ('type: "Power" power_param { power: 0 scale: 4 shift: 3 }', [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),
    ('type: "Exp" exp_param { base: 2 scale: 1 shift: 1 }', [0.5, 2.0, 16.0],
     [0.5 * np.log(2), 2 * np.log(2), 16 * np.log(2)]),
])
def test_closed_form(text, y_exp, g_exp):
    if g_exp is None:
        layer = make_layer(f'name: "n" {text}', [tuple(X0.shape)])
        torch.testing.assert_close(layer(X0), torch.tensor([y_exp], dtype=torch.float32))
        return
    y, g = _grad(text, X0)
    torch.testing.assert_close(y, torch.tensor([y_exp], dtype=torch.float32))
    torch.testing.assert_close(g, torch.tensor([g_exp], dtype=torch.float32))


def test_prelu_at_zero_and_blob_shapes():
    layer = make_layer('name: "p" type: "PReLU"', [(1, 3, 1, 1)])
    assert tuple(layer.blobs[0].shape) == (3,)
    torch.testing.assert_close(layer.blobs[0].detach(), torch.full((3,), 0.25))  # default filler
    with torch.no_grad():
        layer.blobs[0].copy_(torch.tensor([0.1, 0.2, 0.3]))
    x = torch.tensor([-2.0, 0.0, 3.0]).reshape(1, 3, 1, 1).requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y.flatten(), torch.tensor([-0.2, 0.0, 3.0]))
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([0.1, 0.2, 1.0]))  # x == 0 takes a
    torch.testing.assert_close(layer.blobs[0].grad, torch.tensor([-2.0, 0.0, 0.0]))
    shared = make_layer('name: "p" type: "PReLU" prelu_param { channel_shared: true }', [(2, 3, 4)])
    assert tuple(shared.blobs[0].shape) == ()


def test_bnll_matches_caffe_stable_form():
    x = torch.tensor([-80.0, -20.0, -1.0, 0.0, 1e-3, 1.0, 19.0, 21.0, 60.0])
    y, g = _grad('type: "BNLL"', x)
    caffe = torch.where(x > 0, x + torch.log(1 + torch.exp(-x)), torch.log(1 + torch.exp(x)))
    torch.testing.assert_close(y, caffe, rtol=1e-6, atol=1e-7)
    ex = torch.exp(torch.clamp(x, max=50.0))
    torch.testing.assert_close(g, ex / (ex + 1))


def test_log_base():
    x = torch.tensor([1.0, 10.0, 100.0])
    y, g = _grad('type: "Log" log_param { base: 10 }', x)
    torch.testing.assert_close(y, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(g, 1 / (x * np.log(10.0)))


@pytest.mark.parametrize("text", [t for t in GRADCHECK_CASES] + ['type: "Threshold"', 'type: "BNLL"'])
@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_bottom_untouched_and_shape_dtype_kept(text, phase):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 0.5 + 2.0  # Log needs shift + scale*x > 0
    before = x.clone()
    layer = make_layer(f'name: "n" {text}', [tuple(x.shape)], phase).double()
    y = layer(x)
    assert torch.equal(x, before)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert layer.top_shapes([(2, 3, 4, 5)]) == [(2, 3, 4, 5)]


# -- parameter errors ------------------------------------------------------------------
@pytest.mark.parametrize("text,shape,match", [
    ('type: "Dropout" dropout_param { dropout_ratio: 1.0 }', (2, 3), r"dropout_ratio \(1\) must be in \[0, 1\)"),
    ('type: "Dropout" dropout_param { dropout_ratio: -0.1 }', (2, 3), "dropout_ratio"),
    ('type: "Exp" exp_param { base: 0 }', (2, 3), r"base \(0\) must be strictly positive"),
    ('type: "Log" log_param { base: -2 }', (2, 3), r"base \(-2\) must be strictly positive"),
    ('type: "AbsVal" bottom: "x" top: "x"', (2, 3), "cannot run in place"),
    ('type: "PReLU"', (5,), "at least 2 axes"),
    ('type: "Clip" clip_param { min: 1 }', (2, 3), "needs both min and max"),
    ('type: "Clip" clip_param { min: 1 max: 0 }', (2, 3), r"min \(1\) must not exceed max \(0\)"),
])
def test_errors(text, shape, match):
    with pytest.raises(LayerError, match=match) as err:
        make_layer(f'name: "bad" {text}', [shape])
    assert "layer 'bad'" in str(err.value)
