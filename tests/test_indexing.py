"""BatchReindex, Embed, Filter, Parameter, and the extra losses, against closed forms."""
import numpy as np
import pytest
import torch

from caffe_compat.engine.layers.base import LayerError
from layer_utils import make_layer

g = torch.Generator().manual_seed(5)


def test_batch_reindex_gathers_and_accumulates_gradients():
    layer = make_layer('name: "b" type: "BatchReindex"', [(3, 2), (4,)])
    x = torch.arange(6, dtype=torch.float64).reshape(3, 2).requires_grad_()
    y = layer(x, torch.tensor([2., 2., 0., 2.], dtype=torch.float64))
    np.testing.assert_array_equal(y.detach().numpy(), [[4, 5], [4, 5], [0, 1], [4, 5]])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 1], [0, 0], [3, 3]])
    with pytest.raises(LayerError, match=r"index 3 is out of range \[0, 3\)"):
        layer(x, torch.tensor([3.], dtype=torch.float64))


def test_embed_rows_plus_bias_and_rejects_fractional_indices():
    layer = make_layer('name: "e" type: "Embed" embed_param { num_output: 2 input_dim: 3 '
                       'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
                       [(2, 2)])
    w, b = (p.detach().numpy() for p in layer.blobs)
    assert w.shape == (3, 2) and b.shape == (2,)
    y = layer(torch.tensor([[2., 0.], [1., 2.]]))
    np.testing.assert_allclose(y.detach().numpy(), w[[[2, 0], [1, 2]]] + b, rtol=1e-6)
    with pytest.raises(LayerError, match="whole numbers"):
        layer(torch.tensor([[0.5, 0.], [1., 2.]]))


def test_filter_keeps_nonzero_selector_rows_in_every_bottom():
    layer = make_layer('name: "f" type: "Filter" top: "a" top: "b"', [(4, 2), (4,), (4, 1)])
    a, b = layer(torch.arange(8.).reshape(4, 2), torch.arange(4.), torch.tensor([[0.], [2.], [0.], [-1.]]))
    np.testing.assert_array_equal(a.numpy(), [[2, 3], [6, 7]])
    np.testing.assert_array_equal(b.numpy(), [1, 3])
    assert layer.no_grad_bottoms == (2,)
    with pytest.raises(LayerError, match="singletons"):
        make_layer('name: "f" type: "Filter" top: "a"', [(4, 2), (4, 2)])


def test_parameter_is_a_zero_initialised_learnable_top():
    layer = make_layer('name: "p" type: "Parameter" parameter_param { shape { dim: 2 dim: 1 } }', [])
    assert layer.top_shapes([]) == [(2, 1)]
    out = layer()
    assert not out.detach().any() and out.requires_grad
    out.sum().backward()
    np.testing.assert_array_equal(layer.blobs[0].grad.numpy(), [[1], [1]])


def test_contrastive_loss_closed_form_and_caffes_dissimilar_gradient():
    layer = make_layer('name: "c" type: "ContrastiveLoss" contrastive_loss_param { margin: 2 }',
                       [(3, 2), (3, 2), (3,)])
    a = torch.tensor([[0., 0.], [1., 0.], [0., 0.]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[3., 4.], [0., 0.], [0., 5.]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1., 0., 0.], dtype=torch.float64)
    loss = layer(a, b, y)
    # similar d²=25; dissimilar d=1 → (2-1)²; dissimilar d=5 beyond the margin → 0
    assert loss.item() == pytest.approx((25 + 1) / 3 / 2)
    loss.backward()
    np.testing.assert_allclose(a.grad[0].numpy(), [-3 / 3, -4 / 3])
    # Caffe: -(margin - d)/(d + 1e-4) · (a - b) / N = -(1 / 1.0001) · [1, 0] / 3
    np.testing.assert_allclose(a.grad[1].numpy(), [-1 / 1.0001 / 3, 0], rtol=1e-12)
    np.testing.assert_array_equal(a.grad[2].numpy(), [0, 0])
    np.testing.assert_allclose(b.grad.numpy(), -a.grad.numpy())


def test_multinomial_logistic_loss_clamps_like_caffe():
    layer = make_layer('name: "m" type: "MultinomialLogisticLoss"', [(2, 3), (2,)])
    p = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.4, 0.6]], dtype=torch.float64, requires_grad=True)
    loss = layer(p, torch.tensor([1., 0.], dtype=torch.float64))
    assert loss.item() == pytest.approx(-(np.log(0.5) + np.log(1e-20)) / 2)
    loss.backward()
    np.testing.assert_allclose(p.grad.numpy(), [[0, -1 / (2 * 0.5), 0], [-1 / (2 * 1e-20), 0, 0]])
