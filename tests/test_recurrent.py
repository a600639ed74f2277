"""LSTM / RNN / LSTMUnit beyond the goldens: float64 reference formulas, the state carried
between forwards (Caffe copies h_T into h_0), expose_hidden, and shape errors."""
import numpy as np
import pytest
import torch

from caffe_compat.engine.layers.base import LayerError
from layer_utils import make_layer

g = torch.Generator().manual_seed(3)
GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def rnn_reference(x, cont, blobs, h):
    """Caffe's RNN equations in float64 numpy, one step at a time."""
    w_xh, b_h, w_hh, w_ho, b_o = (b.detach().double().numpy() for b in blobs)
    out = []
    for t in range(x.shape[0]):
        h = np.tanh(x[t] @ w_xh.T + b_h + (cont[t][:, None] * h) @ w_hh.T)
        out.append(np.tanh(h @ w_ho.T + b_o))
    return np.stack(out), h


def test_rnn_matches_reference_and_carries_state_between_forwards():
    layer = make_layer(f'name: "r" type: "RNN" top: "o" recurrent_param {{ num_output: 3 {GAUSS} }}',
                       [(3, 2, 4), (3, 2)])
    x1 = torch.randn(3, 2, 4, generator=g)
    x2 = torch.randn(3, 2, 4, generator=g)
    first = torch.tensor([[0., 0.], [1., 1.], [1., 1.]])
    cont2 = torch.tensor([[1., 0.], [1., 1.], [0., 1.]])    # stream 0 continues the last batch
    o1 = layer(x1, first)
    ref1, h_T = rnn_reference(x1.double().numpy(), first.numpy(), layer.blobs, np.zeros((2, 3)))
    np.testing.assert_allclose(o1.detach().numpy(), ref1, rtol=1e-5, atol=1e-6)
    o2 = layer(x2, cont2)
    ref2, _ = rnn_reference(x2.double().numpy(), cont2.numpy(), layer.blobs, h_T)
    np.testing.assert_allclose(o2.detach().numpy(), ref2, rtol=1e-5, atol=1e-6)
    fresh, _ = rnn_reference(x2.double().numpy(), cont2.numpy(), layer.blobs, np.zeros((2, 3)))
    assert not np.allclose(o2.detach().numpy()[0, 0], fresh[0, 0])   # the carry mattered


def test_lstm_expose_hidden_uses_bottoms_and_returns_final_states():
    text = (f'name: "l" type: "LSTM" top: "h" top: "hT" top: "cT" '
            f'recurrent_param {{ num_output: 2 expose_hidden: true {GAUSS} }}')
    layer = make_layer(text, [(2, 3, 1), (2, 3), (1, 3, 2), (1, 3, 2)])
    x = torch.randn(2, 3, 1, generator=g)
    cont = torch.ones(2, 3)
    h0, c0 = torch.randn(1, 3, 2, generator=g), torch.randn(1, 3, 2, generator=g)
    h, h_T, c_T = layer(x, cont, h0, c0)
    w_xc, b_c, w_hc = (b.detach().double() for b in layer.blobs)
    hp, cp = h0[0].double(), c0[0].double()
    for t in range(2):
        gates = x[t].double() @ w_xc.T + b_c + hp @ w_hc.T
        i, f, o = (torch.sigmoid(gates[:, k * 2:(k + 1) * 2]) for k in range(3))
        cp = f * cp + i * torch.tanh(gates[:, 6:])
        hp = o * torch.tanh(cp)
        np.testing.assert_allclose(h[t].detach().numpy(), hp.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_T[0].numpy(), hp.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_T[0].numpy(), cp.numpy(), rtol=1e-5, atol=1e-6)
    assert not h_T.requires_grad and not c_T.requires_grad   # Caffe 1.0 ignores their diffs


def test_lstm_unit_fractional_cont_uses_caffes_forget_gradient():
    layer = make_layer('name: "u" type: "LSTMUnit"', [(1, 2, 1), (1, 2, 4), (1, 2)])
    c_prev = torch.tensor([[[0.7], [-0.4]]], dtype=torch.float64)
    x = torch.randn(1, 2, 4, generator=g, dtype=torch.float64).requires_grad_()
    cont = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    c, _ = layer(c_prev, x, cont)
    c.sum().backward()
    f = 0.5 * torch.sigmoid(x.detach()[0, 0, 1])
    # Caffe: dc/dx_f = c_prev · f (1 - f) with f = cont·sigmoid (not cont·σ(1-σ))
    np.testing.assert_allclose(x.grad[0, 0, 1].item(), (0.7 * f * (1 - f)).item(), rtol=1e-12)


def test_recurrent_shape_errors_name_the_layer():
    with pytest.raises(LayerError, match=r"'r' \(RNN\).*bottom 1 \(cont\)"):
        make_layer('name: "r" type: "RNN" recurrent_param { num_output: 2 }', [(3, 2, 4), (3, 1)])
    with pytest.raises(LayerError, match="takes 3 or 4 bottoms"):
        make_layer('name: "r" type: "RNN" recurrent_param { num_output: 2 expose_hidden: true }',
                   [(3, 2, 4), (3, 2)])
    with pytest.raises(LayerError, match="initial state bottom 2 must be"):
        make_layer('name: "r" type: "RNN" recurrent_param { num_output: 2 expose_hidden: true }',
                   [(3, 2, 4), (3, 2), (1, 2, 3)])
