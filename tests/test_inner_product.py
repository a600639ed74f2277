"""InnerProduct: Caffe goldens, axis/transpose semantics, gradients, shapes, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat.engine.layers.inner_product  # noqa: F401  (registers the layer)
from caffe_compat.engine.layers import TEST, LayerError, layer_class
from caffe_compat.proto import caffe_pb2
from layer_utils import gradcheck_layer, make_layer

GOLDENS = Path(__file__).parent / "goldens" / "layers"


@pytest.mark.parametrize("case", ["inner_product_4d", "inner_product_transpose_axis2"])
def test_golden(case):
    with open(f"{GOLDENS}/{case}/net.prototxt") as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    z = np.load(f"{GOLDENS}/{case}/golden.npz")
    lp = net.layer[1]
    x = torch.from_numpy(z["in/data"]).requires_grad_()
    layer = layer_class(lp.type)(lp, [tuple(x.shape)], TEST)
    for i, blob in enumerate(layer.blobs):
        blob.data.copy_(torch.from_numpy(z[f"param/ip/{i}"]))
    y = layer(x)
    assert layer.top_shapes([tuple(x.shape)]) == [z["blob/out"].shape]
    np.testing.assert_allclose(y.detach().numpy(), z["blob/out"], rtol=1e-4, atol=1e-5)
    y.backward(torch.from_numpy(z["top_diff/out"]))
    np.testing.assert_allclose(x.grad.numpy(), z["diff/data"], rtol=1e-3, atol=1e-5)
    for i, blob in enumerate(layer.blobs):
        np.testing.assert_allclose(blob.grad.numpy(), z[f"param_diff/ip/{i}"], rtol=1e-3, atol=1e-5)


def ip_text(params: str) -> str:
    return f'name: "ip" type: "InnerProduct" inner_product_param {{ {params} }}'


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    for b in layer.blobs:
        b.data.copy_(torch.randn(b.shape, generator=g))
    return layer


@pytest.mark.parametrize("params,shape,out,wshape", [
    ("num_output: 5", (3, 4, 3, 2), (3, 5), (5, 24)),
    ("num_output: 5 axis: 2", (3, 4, 3, 2), (3, 4, 5), (5, 6)),
    ("num_output: 5 axis: -1 transpose: true", (3, 4, 3, 2), (3, 4, 3, 5), (2, 5)),
    ("num_output: 2 axis: 0", (3, 4), (2,), (2, 12)),
])
def test_shapes_and_values(params, shape, out, wshape):
    layer = _randomize(make_layer(ip_text(params), [shape]))
    assert tuple(layer.blobs[0].shape) == wshape and tuple(layer.blobs[1].shape) == (out[-1],)
    assert layer.top_shapes([shape]) == [out]
    x = torch.randn(shape)
    axis = len(out) - 1  # out = shape[:axis] + (N,)
    w = layer.blobs[0].detach()
    w = w if "transpose" not in params else w.t()  # as [N, K]
    want = x.reshape(int(np.prod(shape[:axis])), -1) @ w.t() + layer.blobs[1].detach()
    torch.testing.assert_close(layer(x), want.reshape(out))


@pytest.mark.parametrize("params,shape", [
    ("num_output: 3", (2, 2, 2)),
    ("num_output: 3 transpose: true axis: 2", (2, 2, 3)),
    ("num_output: 2 bias_term: false", (3, 4)),
])
def test_gradcheck(params, shape):
    layer = _randomize(make_layer(ip_text(params), [shape]))
    gradcheck_layer(layer, [torch.randn(shape)])


def test_default_fillers_and_no_bias():
    layer = make_layer(ip_text("num_output: 3 bias_term: false"), [(2, 4)])
    assert len(layer.blobs) == 1 and not layer.blobs[0].any()
    torch.manual_seed(0)
    layer = make_layer(ip_text('num_output: 3 weight_filler { type: "xavier" } '
                               'bias_filler { type: "constant" value: 0.1 }'), [(2, 4)])
    assert layer.blobs[0].abs().max() <= (3 / 4) ** 0.5 and layer.blobs[0].any()
    assert (layer.blobs[1] == 0.1).all()


def test_reshape_to_new_batch():
    layer = make_layer(ip_text("num_output: 3"), [(2, 4, 5)])
    assert layer.top_shapes([(7, 2, 10)]) == [(7, 3)]  # K = 20 either way
    with pytest.raises(LayerError, match="must have 20 elements"):
        layer.top_shapes([(7, 4, 4)])


@pytest.mark.parametrize("params,shape,message", [
    ("", (2, 4), "num_output must be set"),
    ("num_output: 2 axis: 2", (2, 4), "axis 2 is out of range for a 2-D bottom"),
    ("num_output: 2 axis: -3", (2, 4), "axis -3 is out of range"),
    ('num_output: 2 weight_filler { type: "bilinear" }', (2, 4),
     "weight_filler: bilinear filler needs a 4-D blob"),
    ('num_output: 2 bias_filler { type: "nope" }', (2, 4), "bias_filler: Unknown filler type: nope"),
])
def test_errors(params, shape, message):
    with pytest.raises(LayerError) as e:
        make_layer(f'name: "bad" type: "InnerProduct" inner_product_param {{ {params} }}', [shape])
    assert "layer 'bad' (InnerProduct)" in str(e.value) and message in str(e.value)
