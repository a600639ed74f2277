"""BatchNorm, Scale, Bias: Caffe goldens, float64 gradient checks, running sums, errors."""
from __future__ import annotations


import pytest
import torch
from google.protobuf import text_format

import caffe_compat.engine.layers.norm  # noqa: F401  (registers the layers)
from caffe_compat.engine.layers import TEST, TRAIN, LayerError, layer_class
from caffe_compat.proto import caffe_pb2
from layer_utils import BWD, FWD, Golden, gradcheck_layer, make_layer



def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


def _grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


# -- goldens -------------------------------------------------------------------------
def test_golden_batchnorm_scale_train():
    g = Golden("batchnorm_scale_train")
    assert g.phase == TRAIN
    x = _leaf(g.t("in/data"))
    bn = g.layer("bn", x, load=False)  # the statistics start at 0, as Caffe's do
    scale = g.layer("scale", x)
    y_bn = bn(x)
    out = scale(y_bn)
    torch.testing.assert_close(y_bn, g.t("blob/bn"), **FWD)
    torch.testing.assert_close(out, g.t("blob/out"), **FWD)
    for i in range(3):  # running sums after one TRAIN forward
        torch.testing.assert_close(bn.blobs[i].detach(), g.t(f"param/bn/{i}"), **FWD)
    (out * g.t("top_diff/out")).sum().backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)
    for i in range(2):
        torch.testing.assert_close(scale.blobs[i].grad, g.t(f"param_diff/scale/{i}"), **BWD)
    for i in range(3):
        torch.testing.assert_close(_grad_or_zero(bn.blobs[i]), g.t(f"param_diff/bn/{i}"))


def test_golden_batchnorm_global_stats_test():
    g = Golden("batchnorm_global_stats_test")
    x = _leaf(g.t("in/data"))
    bn = g.layer("bn", x)
    out = bn(x)
    torch.testing.assert_close(out, g.t("blob/out"), **FWD)
    for i in range(3):  # TEST with global stats leaves the sums alone
        torch.testing.assert_close(bn.blobs[i].detach(), g.t(f"param/bn/{i}"), rtol=0, atol=0)
    (out * g.t("top_diff/out")).sum().backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)
    for i in range(3):
        torch.testing.assert_close(_grad_or_zero(bn.blobs[i]), g.t(f"param_diff/bn/{i}"))


def test_golden_bias_scale_bottoms():
    g = Golden("bias_scale_bottoms")
    x, s, b = _leaf(g.t("in/data")), _leaf(g.t("in/s")), _leaf(g.t("in/b"))
    sc_layer, bi_layer, bl_layer = g.layer("sc", x, s), g.layer("bi", x, b), g.layer("bl", x)
    assert len(sc_layer.blobs) == 0 and len(bi_layer.blobs) == 0
    sc = sc_layer(x, s)
    bi = bi_layer(sc, b)
    bl = bl_layer(x)
    for name, y in [("sc", sc), ("bi", bi), ("bl", bl)]:
        torch.testing.assert_close(y, g.t(f"blob/{name}"), **FWD, msg=name)
    ((bi * g.t("top_diff/bi")).sum() + (bl * g.t("top_diff/bl")).sum()).backward()
    torch.testing.assert_close(x.grad, g.t("diff/data"), **BWD)
    torch.testing.assert_close(s.grad, g.t("diff/s"), **BWD)
    torch.testing.assert_close(b.grad, g.t("diff/b"), **BWD)
    torch.testing.assert_close(bl_layer.blobs[0].grad, g.t("param_diff/bl/0"), **BWD)


# -- BatchNorm ---------------------------------------------------------------------------
BN = 'name: "bn" type: "BatchNorm" '


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 3), (2, 3, 2, 2, 2), (6,)])
@pytest.mark.parametrize("text,phase", [
    ("", TRAIN),
    ("", TEST),
    ("batch_norm_param { use_global_stats: false eps: 0.01 }", TEST),
    ("batch_norm_param { use_global_stats: true }", TRAIN),
])
def test_batchnorm_gradcheck(shape, text, phase):
    torch.manual_seed(0)
    layer = make_layer(BN + text, [shape], phase)
    c = 1 if len(shape) == 1 else shape[1]
    with torch.no_grad():  # some accumulated statistics for the global-stats path
        layer.blobs[0].copy_(torch.randn(c) * 2)
        layer.blobs[1].copy_(torch.rand(c) * 3 + 0.5)
        layer.blobs[2].fill_(2.5)
    gradcheck_layer(layer, [torch.randn(shape, dtype=torch.float64) * 2 + 1])


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 3), (7,)])
def test_batchnorm_running_sums(shape):
    layer = make_layer(BN + "batch_norm_param { moving_average_fraction: 0.8 eps: 0.001 }",
                       [shape], TRAIN)
    xc = lambda x: x.reshape(-1, 1) if x.dim() == 1 else x.movedim(1, -1).reshape(-1, x.shape[1])
    lam, mean_sum, var_sum, factor = 0.8, 0.0, 0.0, 0.0
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (step + 1) + step
        flat = xc(x)  # (m, C)
        mu, var = flat.mean(0), flat.var(0, unbiased=False)
        m = flat.shape[0]
        y = layer.double()(x)
        torch.testing.assert_close(xc(y), (flat - mu) / torch.sqrt(var + 0.001))
        factor = lam * factor + 1
        mean_sum = lam * mean_sum + mu
        var_sum = lam * var_sum + m / (m - 1) * var
        torch.testing.assert_close(layer.blobs[0].detach(), mean_sum)
        torch.testing.assert_close(layer.blobs[1].detach(), var_sum)
        torch.testing.assert_close(layer.blobs[2].detach(), torch.tensor([factor], dtype=torch.float64))
    # A TEST-phase layer sharing these sums normalises with mean_sum/s and var_sum/s.
    test = make_layer(BN + "batch_norm_param { eps: 0.001 }", [shape], TEST).double()
    for src, dst in zip(layer.blobs, test.blobs):
        dst.data = src.data
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(xc(test(x)), (xc(x) - mean_sum / factor) / torch.sqrt(var_sum / factor + 0.001))


def test_batchnorm_global_stats_with_zero_factor_uses_zero_stats():
    layer = make_layer(BN + "batch_norm_param { eps: 0.25 }", [(2, 3)], TEST)
    with torch.no_grad():
        layer.blobs[0].fill_(7.0)
        layer.blobs[1].fill_(9.0)  # ignored while the scale factor is 0
    x = torch.randn(2, 3)
    torch.testing.assert_close(layer(x), x / 0.5)


def test_batchnorm_one_value_per_channel():
    layer = make_layer(BN, [(1, 3, 1, 1)], TRAIN)
    x = torch.tensor([1.0, -2.0, 3.0]).reshape(1, 3, 1, 1).requires_grad_(True)
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(layer.blobs[0].detach(), torch.tensor([1.0, -2.0, 3.0]))
    torch.testing.assert_close(layer.blobs[1].detach(), torch.zeros(3))


def test_batchnorm_blobs_and_param_specs():
    param = text_format.Parse(BN + "param { lr_mult: 0 }", caffe_pb2.LayerParameter())
    layer = layer_class("BatchNorm")(param, [(2, 5, 3)], TRAIN)
    assert [tuple(b.shape) for b in layer.blobs] == [(5,), (5,), (1,)]
    assert not any(b.requires_grad for b in layer.blobs)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in layer.blobs)
    # Caffe appends lr_mult-0 specs for the blobs the prototxt leaves out, on its own copy.
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    assert len(param.param) == 1
    assert layer.use_global_stats is False
    assert make_layer(BN, [(2, 5)], TEST).use_global_stats is True


def test_batchnorm_learnable_stats_rejected():
    with pytest.raises(LayerError, match=r"layer 'bn'.*param 1 has lr_mult 1"):
        make_layer(BN + "param { lr_mult: 0 } param { lr_mult: 1 }", [(2, 3)])


# -- Scale / Bias --------------------------------------------------------------------------
@pytest.mark.parametrize("text,shapes,blob_shapes", [
    ('type: "Scale"', [(2, 3, 4, 5)], [(3,)]),
    ('type: "Scale" scale_param { bias_term: true }', [(2, 3, 4, 5)], [(3,), (3,)]),
    ('type: "Scale" scale_param { axis: 2 num_axes: -1 }', [(2, 3, 4, 5)], [(4, 5)]),
    ('type: "Scale" scale_param { axis: -3 num_axes: 2 bias_term: true }', [(2, 3, 4, 5)], [(3, 4), (3, 4)]),
    ('type: "Scale" scale_param { num_axes: 0 bias_term: true }', [(2, 3, 4)], [(), ()]),
    ('type: "Scale" scale_param { axis: 0 }', [(2, 3), (2, 3)], []),
    ('type: "Scale" scale_param { axis: 1 bias_term: true }', [(2, 3, 4), (3, 4)], [(3, 4)]),
    ('type: "Scale" scale_param { axis: 2 }', [(2, 3, 4), ()], []),
    ('type: "Bias"', [(2, 3, 4, 5)], [(3,)]),
    ('type: "Bias" bias_param { axis: -1 }', [(2, 3, 4)], [(4,)]),
    ('type: "Bias" bias_param { axis: 0 num_axes: -1 }', [(2, 3)], [(2, 3)]),
    ('type: "Bias" bias_param { num_axes: 0 }', [(2, 3)], [()]),
    ('type: "Bias" bias_param { axis: 1 }', [(2, 3, 4), (3,)], []),
])
def test_scale_bias_gradcheck(text, shapes, blob_shapes):
    torch.manual_seed(0)
    layer = make_layer(f'name: "s" {text}', shapes)
    assert [tuple(b.shape) for b in layer.blobs] == blob_shapes
    assert layer.top_shapes(shapes) == [shapes[0]]
    with torch.no_grad():
        for b in layer.blobs:
            b.copy_(torch.randn(b.shape))
    gradcheck_layer(layer, [torch.randn(s, dtype=torch.float64) for s in shapes])


def test_scale_bias_default_fillers_and_values():
    scale = make_layer('name: "s" type: "Scale" scale_param { bias_term: true }', [(2, 3)])
    assert torch.equal(scale.blobs[0].detach(), torch.ones(3))
    assert torch.equal(scale.blobs[1].detach(), torch.zeros(3))
    bias = make_layer('name: "b" type: "Bias"', [(2, 3)])
    assert torch.equal(bias.blobs[0].detach(), torch.zeros(3))
    filled = make_layer('name: "s" type: "Scale" scale_param { filler { type: "constant" value: 2 } '
                        'bias_term: true bias_filler { type: "constant" value: -1 } }', [(2, 3)])
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(filled(x), 2 * x - 1)
    # Axes [1, 3) of a (2, 3, 4) bottom with gamma of shape (3, 4).
    two = make_layer('name: "s" type: "Scale"', [(2, 3, 4), (3, 4)])
    gamma = torch.randn(3, 4)
    torch.testing.assert_close(two(x, gamma), x * gamma[None])


@pytest.mark.parametrize("text,shapes,match", [
    ('type: "Scale" scale_param { axis: 4 }', [(2, 3, 4, 5)], r"axis 4 is out of range for a 4-D bottom"),
    ('type: "Scale" scale_param { axis: -5 }', [(2, 3, 4, 5)], r"axis -5 is out of range"),
    ('type: "Scale" scale_param { axis: 2 num_axes: 3 }', [(2, 3, 4, 5)], r"axis \(2\) \+ num_axes \(3\) exceeds"),
    ('type: "Scale" scale_param { num_axes: -2 }', [(2, 3)], r"num_axes \(-2\) must be non-negative"),
    ('type: "Scale"', [(2, 3, 4), (4,)], r"scale shape \[4\] does not match bottom shape \[2, 3, 4\]"),
    ('type: "Bias" bias_param { axis: 0 }', [(2, 3, 4), (2, 4)], r"bias shape \[2, 4\] does not match"),
    ('type: "Bias" bias_param { axis: 2 }', [(2, 3, 4), (4, 1)], r"does not match"),
])
def test_scale_bias_errors(text, shapes, match):
    with pytest.raises(LayerError, match=match) as err:
        make_layer(f'name: "bad" {text}', shapes)
    assert "layer 'bad'" in str(err.value)


def test_mvn_divides_by_std_plus_eps():
    """Caffe MVN: (x - mean) / (sqrt(E[(x - mean)^2]) + eps), per (n, c) or per n."""
    from layer_utils import make_layer
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    layer = make_layer('name: "m" type: "MVN" mvn_param { eps: 0.5 }', [(2, 3, 4, 5)])
    c = x - x.mean(dim=(2, 3), keepdim=True)
    expected = c / (c.pow(2).mean(dim=(2, 3), keepdim=True).sqrt() + 0.5)
    torch.testing.assert_close(layer(x), expected)
    across = make_layer('name: "m" type: "MVN" mvn_param { across_channels: true '
                        'normalize_variance: false }', [(2, 3, 4, 5)])
    torch.testing.assert_close(across(x), x - x.mean(dim=(1, 2, 3), keepdim=True))
