"""Layer behaviours found diverging from BVLC Caffe in a review of engine/layers against
src/caffe/layers: each expectation is hand-computed or a float64 loop of Caffe's kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat.engine.layers import TEST, TRAIN, LayerError
from layer_utils import make_layer


# ------------------------------------------------------------------ Eltwise MAX with coeff


def test_eltwise_max_accepts_and_ignores_coeff():
    """eltwise_layer.cpp rejects coefficients only for PROD; MAX never reads them."""
    layer = make_layer('name: "e" type: "Eltwise" '
                       'eltwise_param { operation: MAX coeff: 2 coeff: -1 }', [(1, 3), (1, 3)])
    a = torch.tensor([[1.0, -2.0, 5.0]])
    b = torch.tensor([[0.0, 3.0, 5.0]])
    assert torch.equal(layer(a, b), torch.tensor([[1.0, 3.0, 5.0]]))


def test_eltwise_prod_still_rejects_coeff():
    with pytest.raises(LayerError, match="coeff"):
        make_layer('name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 1 }',
                   [(1, 3), (1, 3)])


# ------------------------------------------------------------------ Log base 1


def test_log_base_one_is_a_layer_error():
    """log(1) = 0 makes Caffe's base_scale 1/0 = inf, which its CHECK refuses."""
    with pytest.raises(LayerError, match="base"):
        make_layer('name: "l" type: "Log" log_param { base: 1 }', [(2, 3)])


# ------------------------------------------------------------------ STOCHASTIC pooling


def _stochastic_test_reference(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """StoPoolForwardTest: windows from ph*stride clipped to the image (no padding),
    sum(x^2) / sum(x) where sum(x) > 0, else 0; accumulated in float64 here."""
    n, c, h, w = x.shape
    oh = int(np.ceil((h - k) / s)) + 1
    ow = int(np.ceil((w - k) / s)) + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * s:min(i * s + k, h), j * s:min(j * s + k, w)].astype(np.float64)
            total = win.sum(axis=(2, 3))
            squares = (win * win).sum(axis=(2, 3))
            out[:, :, i, j] = np.where(total > 0, squares / np.where(total > 0, total, 1), 0)
    return out


@pytest.mark.parametrize("hw,k,s", [((6, 6), 2, 2), ((5, 7), 3, 2), ((4, 5), 2, 3)])
def test_stochastic_pooling_test_phase_is_the_weighted_average(hw, k, s):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *hw) - 0.2          # some windows sum to <= 0: those give 0
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ pool: STOCHASTIC '
                       f'kernel_size: {k} stride: {s} }}', [tuple(x.shape)], TEST)
    expected = _stochastic_test_reference(x.numpy(), k, s)
    y = layer(x)
    assert tuple(y.shape) == layer.top_shapes([tuple(x.shape)])[0] == expected.shape
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_stochastic_pooling_closed_form_window():
    layer = make_layer('name: "p" type: "Pooling" pooling_param { pool: STOCHASTIC '
                       'kernel_size: 2 stride: 2 }', [(1, 1, 2, 2)], TEST)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert float(layer(x)) == pytest.approx(30.0 / 10.0)


def test_stochastic_pooling_train_samples_in_proportion_to_the_values():
    """StoPoolForwardTrain picks the first element whose running sum reaches u * sum."""
    torch.manual_seed(1)
    n = 4000
    x = torch.tensor([1.0, 3.0, 0.0, 0.0]).reshape(1, 1, 2, 2).repeat(n, 1, 1, 1)
    x.requires_grad_(True)
    layer = make_layer('name: "p" type: "Pooling" pooling_param { pool: STOCHASTIC '
                       'kernel_size: 2 stride: 2 }', [tuple(x.shape)], TRAIN)
    y = layer(x)
    picked = y.detach().reshape(-1)
    assert set(picked.tolist()) <= {1.0, 3.0}
    assert float((picked == 3.0).float().mean()) == pytest.approx(0.75, abs=0.03)
    # The gradient goes to the sampled element only.
    y.sum().backward()
    g = x.grad.reshape(n, 4)
    assert torch.equal(g[:, 0] + g[:, 1], torch.ones(n))
    assert torch.equal(g[:, 1], (picked == 3.0).float())
    assert not g[:, 2:].any()


def test_stochastic_pooling_train_single_positive_element_is_always_picked():
    torch.manual_seed(2)
    x = torch.zeros(5, 2, 4, 4)
    x[:, :, 1, 0] = 2.0        # window (0, 0) of each map
    x[:, :, 3, 3] = 0.5        # window (1, 1)
    layer = make_layer('name: "p" type: "Pooling" pooling_param { pool: STOCHASTIC '
                       'kernel_size: 2 stride: 2 }', [tuple(x.shape)], TRAIN)
    y = layer(x)
    expected = torch.tensor([[2.0, 0.0], [0.0, 0.5]]).expand(5, 2, 2, 2)
    assert torch.equal(y, expected)


def test_stochastic_pooling_rejects_padding():
    with pytest.raises(LayerError, match="[Pp]adding"):
        make_layer('name: "p" type: "Pooling" pooling_param { pool: STOCHASTIC '
                   'kernel_size: 3 pad: 1 }', [(1, 1, 4, 4)], TEST)


# ------------------------------------------------------------------ Log / Exp float constants


def test_log_base_ten_scales_by_caffes_float_reciprocal():
    """log_layer.cpp: base_scale_ = Dtype(1) / log_base, a float division of the float
    log(10); the reciprocal taken in double rounds to a different float (1 ulp)."""
    layer = make_layer('name: "l" type: "Log" log_param { base: 10 }', [(1, 4)])
    x = torch.tensor([[0.3, 2.0, 7.5, 1234.5]])
    caffe_scale = np.float32(1.0) / np.float32(np.log(np.float64(np.float32(10.0))))
    assert caffe_scale != np.float32(1.0 / np.log(10.0))      # the case is a real one
    expected = torch.log(x) * torch.tensor(caffe_scale)
    assert torch.equal(layer(x), expected)


def test_exp_inner_scale_is_a_float_product():
    """exp_layer.cpp: inner_scale_ = log_base * scale, both floats."""
    layer = make_layer('name: "e" type: "Exp" exp_param { base: 1.5 scale: 3 }', [(1, 4)])
    x = torch.tensor([[0.25, -1.0, 2.0, 3.5]])
    inner = np.float32(np.log(np.float64(np.float32(1.5)))) * np.float32(3.0)
    assert inner != np.float32(np.log(1.5) * 3.0)
    expected = torch.exp(x * torch.tensor(inner))
    assert torch.equal(layer(x), expected)


def test_spp_stochastic_test_phase_levels():
    """spp_layer.cpp builds one Pooling per level with the SPP's pool method; for a 4x4
    map every level has pad 0, which STOCHASTIC pooling accepts."""
    torch.manual_seed(3)
    x = torch.rand(2, 3, 4, 4)
    layer = make_layer('name: "s" type: "SPP" spp_param { pyramid_height: 2 pool: STOCHASTIC }',
                       [tuple(x.shape)], TEST)
    levels = [_stochastic_test_reference(x.numpy(), k, k).reshape(2, -1) for k in (4, 2)]
    np.testing.assert_allclose(layer(x).numpy(), np.concatenate(levels, 1), rtol=1e-5, atol=1e-6)


def test_stochastic_pooling_in_a_pycaffe_test_net(tmp_path):
    """The fused TEST plan and pycaffe's forward run the STOCHASTIC form (no MAX fast path)."""
    import caffe_compat as caffe
    path = tmp_path / "net.prototxt"
    path.write_text('input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }\n'
                    'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                    'pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }\n')
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.RandomState(4).rand(1, 2, 4, 4).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["p"]
    np.testing.assert_allclose(out, _stochastic_test_reference(x, 2, 2), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ ELU's exp(x) - 1


def test_elu_negative_side_is_exp_minus_one_like_caffe():
    """elu_layer.cpp: alpha * (exp(min(x, 0)) - 1), not expm1: for x = -1e-5 the two differ
    by 0.14% in float32. The gradient is Caffe's alpha * exp(x) (alpha at x == 0)."""
    layer = make_layer('name: "e" type: "ELU" elu_param { alpha: 0.7 }', [(1, 6)])
    x = torch.tensor([[-1e-5, -1e-3, -0.1, -3.0, 0.0, 2.5]], requires_grad=True)
    y = layer(x)
    xd = x.detach()
    expected = torch.where(xd > 0, xd, 0.7 * (torch.exp(torch.clamp(xd, max=0)) - 1))
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    grad = torch.where(xd > 0, torch.ones_like(xd), 0.7 * torch.exp(xd))
    torch.testing.assert_close(x.grad, grad, rtol=1e-6, atol=0)
