"""LRN: Caffe goldens, Caffe's formulas (forward and its hand-written backward), gradients, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import caffe_compat.engine.layers.lrn  # noqa: F401  (registers the layer)
from caffe_compat.engine.layers import TEST, LayerError, layer_class
from caffe_compat.proto import caffe_pb2
from layer_utils import gradcheck_layer, make_layer

GOLDENS = Path(__file__).parent / "goldens" / "layers"


@pytest.mark.parametrize("case", ["lrn_across", "lrn_within"])
def test_golden(case):
    with open(f"{GOLDENS}/{case}/net.prototxt") as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    z = np.load(f"{GOLDENS}/{case}/golden.npz")
    lp = net.layer[1]
    x = torch.from_numpy(z["in/data"]).requires_grad_()
    layer = layer_class(lp.type)(lp, [tuple(x.shape)], TEST)
    y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), z["blob/out"], rtol=1e-4, atol=1e-5)
    y.backward(torch.from_numpy(z["top_diff/out"]))
    np.testing.assert_allclose(x.grad.numpy(), z["diff/data"], rtol=1e-3, atol=1e-5)


def lrn_text(n, alpha, beta, k, region="ACROSS_CHANNELS"):
    return (f'name: "lrn" type: "LRN" lrn_param {{ local_size: {n} alpha: {alpha} beta: {beta} '
            f'k: {k} norm_region: {region} }}')


def across_scale(x: torch.Tensor, n: int, alpha: float, k: float) -> torch.Tensor:
    """k + alpha/n * sum of x^2 over channels c-n//2 .. c+n//2 (zero outside), by explicit slices."""
    C, h = x.shape[1], n // 2
    sq = x * x
    acc = torch.zeros_like(x)
    for c in range(C):
        acc[:, c] = sq[:, max(0, c - h):min(C, c + h + 1)].sum(1)
    return k + alpha / n * acc


@pytest.mark.parametrize("n,alpha,beta,k", [(1, 1.0, 0.75, 1.0), (3, 0.3, 0.5, 2.0),
                                             (5, 2.0, 0.75, 1.0), (9, 1e-2, 1.5, 0.5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_across_channels_formula_and_caffe_backward(n, alpha, beta, k, layout):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_()
    layer = make_layer(lrn_text(n, alpha, beta, k), [tuple(x.shape)]).double()
    y = layer(x)
    scale = across_scale(x.detach(), n, alpha, k)
    want = x.detach() * scale.pow(-beta)
    torch.testing.assert_close(y, want)
    # Caffe's CrossChannelBackward: dx = dy*scale^-b - 2ab/n * x * window_sum(dy*y/scale)
    dy = torch.randn_like(want)
    y.backward(dy)
    ratio = dy * want / scale
    C, h = x.shape[1], n // 2
    win = torch.stack([ratio[:, max(0, c - h):min(C, c + h + 1)].sum(1) for c in range(C)], 1)
    caffe_dx = dy * scale.pow(-beta) - 2 * alpha * beta / n * x.detach() * win
    torch.testing.assert_close(x.grad, caffe_dx)


@pytest.mark.parametrize("n,alpha,beta,k", [(1, 1.0, 0.75, 1.0), (3, 0.5, 0.75, 7.0),
                                             (5, 2.0, 0.3, 1.0)])
def test_within_channel_formula_ignores_k(n, alpha, beta, k):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    layer = make_layer(lrn_text(n, alpha, beta, k, "WITHIN_CHANNEL"), [tuple(x.shape)])
    h = n // 2
    padded = F.pad(x * x, (h, h, h, h))
    H, W = x.shape[2:]
    window = sum(padded[:, :, i:i + H, j:j + W] for i in range(n) for j in range(n))
    want = x * (1 + alpha / n ** 2 * window).pow(-beta)  # shift is 1 whatever k says
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("n", [3, 5])
def test_gradcheck(region, n):
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    layer = make_layer(lrn_text(n, 0.7, 0.75, 1.5, region), [tuple(x.shape)])
    gradcheck_layer(layer, [x])


def test_defaults_and_shape():
    layer = make_layer('name: "lrn" type: "LRN"', [(2, 3, 4, 5)])
    assert (layer.size, layer.alpha, layer.beta, layer.k) == (5, 1.0, 0.75, 1.0)
    assert layer.top_shapes([(2, 3, 4, 5)]) == [(2, 3, 4, 5)]
    assert len(layer.blobs) == 0
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(layer(x), x * across_scale(x, 5, 1.0, 1.0).pow(-0.75))


@pytest.mark.parametrize("text,shape,message", [
    ('lrn_param { local_size: 4 }', (1, 3, 4, 4), "local_size (4) must be odd"),
    ('lrn_param { local_size: 0 }', (1, 3, 4, 4), "local_size (0) must be odd"),
    ('', (3, 4, 4), "bottom must have 4 axes"),
])
def test_errors(text, shape, message):
    with pytest.raises(LayerError) as e:
        make_layer(f'name: "bad" type: "LRN" {text}', [shape])
    assert "layer 'bad' (LRN)" in str(e.value) and message in str(e.value)
