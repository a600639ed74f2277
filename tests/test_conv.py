"""Convolution / Deconvolution: Caffe goldens, float64 gradient checks, shapes, parameter errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

import caffe_compat.engine.layers.conv  # noqa: F401  (registers the layers)
import caffe_compat.engine.layers.pooling  # noqa: F401
from caffe_compat.engine.layers import TEST, LayerError, layer_class
from caffe_compat.proto import caffe_pb2
from layer_utils import gradcheck_layer, make_layer

GOLDENS = Path(__file__).parent / "goldens" / "layers"


def golden_layer(case: str, name: str):
    """(layer built from the golden net with Caffe's init weights loaded, golden arrays)."""
    with open(f"{GOLDENS}/{case}/net.prototxt") as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    z = np.load(f"{GOLDENS}/{case}/golden.npz")
    lp = next(lp for lp in net.layer if lp.name == name)
    shapes = [z[f"blob/{b}"].shape for b in lp.bottom]
    layer = layer_class(lp.type)(lp, shapes, TEST)
    for i, blob in enumerate(layer.blobs):
        assert tuple(blob.shape) == z[f"param/{name}/{i}"].shape
        blob.data.copy_(torch.from_numpy(z[f"param/{name}/{i}"]))
    return layer, lp, z


def check_golden_single(case: str, name: str):
    """One-layer golden net: forward, input grad and param grads."""
    layer, lp, z = golden_layer(case, name)
    x = torch.from_numpy(z[f"in/{lp.bottom[0]}"]).requires_grad_()
    y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), z[f"blob/{lp.top[0]}"], rtol=1e-4, atol=1e-5)
    assert layer.top_shapes([tuple(x.shape)]) == [z[f"blob/{lp.top[0]}"].shape]
    y.backward(torch.from_numpy(z[f"top_diff/{lp.top[0]}"]))
    np.testing.assert_allclose(x.grad.numpy(), z[f"diff/{lp.bottom[0]}"], rtol=1e-3, atol=1e-5)
    for i, blob in enumerate(layer.blobs):
        np.testing.assert_allclose(blob.grad.numpy(), z[f"param_diff/{name}/{i}"],
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("case,name", [
    ("conv_basic", "conv"), ("conv_1x1_msra", "conv"), ("conv_rect_nobias", "conv"),
    ("conv_stride_group_dilation", "conv"), ("deconv_bilinear_s2", "up"),
    ("deconv_group_dilation", "dc"), ("deconv_k4_s4", "up"),
])
def test_golden(case, name):
    check_golden_single(case, name)


def test_golden_inplace_chain_conv_pool():
    # conv -> ReLU (in place) -> Dropout (TEST: identity, in place) -> max pool.
    conv, _, z = golden_layer("inplace_chain", "conv")
    pool, _, _ = golden_layer("inplace_chain", "pool")
    x = torch.from_numpy(z["in/data"]).requires_grad_()
    c = torch.relu(conv(x))
    np.testing.assert_allclose(c.detach().numpy(), z["blob/conv"], rtol=1e-4, atol=1e-5)
    out = pool(c)
    np.testing.assert_allclose(out.detach().numpy(), z["blob/out"], rtol=1e-4, atol=1e-5)
    out.backward(torch.from_numpy(z["top_diff/out"]))
    np.testing.assert_allclose(x.grad.numpy(), z["diff/data"], rtol=1e-3, atol=1e-5)
    for i, blob in enumerate(conv.blobs):
        np.testing.assert_allclose(blob.grad.numpy(), z[f"param_diff/conv/{i}"], rtol=1e-3, atol=1e-5)


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    for b in layer.blobs:
        b.data.copy_(torch.randn(b.shape, generator=g))
    return layer


@pytest.mark.parametrize("type_,params,shape", [
    ("Convolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 2 dilation: 2 group: 2", (1, 4, 5, 6)),
    ("Convolution", "num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 1 pad_w: 1 "
                    "bias_term: false", (1, 2, 5, 4)),
    ("Convolution", "num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 7)),            # 1-D
    ("Convolution", "num_output: 2 kernel_size: 2 kernel_size: 1 kernel_size: 2 pad: 1 "
                    "stride: 1 stride: 2 stride: 1", (1, 2, 3, 4, 3)),                       # 3-D
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2 group: 2",
     (1, 4, 3, 3)),
    ("Deconvolution", "num_output: 2 kernel_size: 4 stride: 2 pad: 1", (2, 3, 4)),         # 1-D
])
def test_gradcheck(type_, params, shape):
    layer = _randomize(make_layer(f'name: "l" type: "{type_}" convolution_param {{ {params} }}',
                                  [shape]))
    gradcheck_layer(layer, [torch.randn(shape)])


def test_gradcheck_axis2_two_bottoms():
    text = ('name: "l" type: "Convolution" bottom: "a" bottom: "b" top: "c" top: "d" '
            'convolution_param { num_output: 2 kernel_size: 2 axis: 2 }')
    shape = (2, 1, 2, 3, 3)  # batch axes (2, 1), channels 2, spatial 3x3
    layer = _randomize(make_layer(text, [shape, shape]))
    gradcheck_layer(layer, [torch.randn(shape), torch.randn(shape)])


def test_axis_and_multiple_bottoms_share_weights():
    text = ('name: "l" type: "Convolution" bottom: "a" bottom: "b" top: "c" top: "d" '
            'convolution_param { num_output: 5 kernel_size: 3 axis: -3 }')
    shape = (2, 3, 4, 6, 7)
    layer = _randomize(make_layer(text, [shape, shape]))
    a, b = torch.randn(shape), torch.randn(shape)
    c, d = layer(a, b)
    assert layer.top_shapes([shape, shape]) == [(2, 3, 5, 4, 5)] * 2
    w, bias = layer.blobs
    for x, y in ((a, c), (b, d)):
        ref = F.conv2d(x.reshape(6, 4, 6, 7), w, bias).reshape(2, 3, 5, 4, 5)
        torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("params,in_hw,out_hw", [
    ("kernel_size: 3", (9, 9), (7, 7)),
    ("kernel_size: 3 pad: 1 stride: 2", (9, 8), (5, 4)),
    ("kernel_size: 3 pad_h: 1", (9, 9), (9, 7)),                    # a lone pad_h: pad_w is 0
    ("kernel_size: 3 dilation: 3 pad: 2", (10, 11), (8, 9)),        # extent 7
    ("kernel_h: 1 kernel_w: 5 stride_h: 3 stride_w: 2 pad_h: 0 pad_w: 2", (10, 9), (4, 5)),
    ("kernel_size: 2 kernel_size: 3 pad: 0 pad: 1 stride: 2 stride: 1 dilation: 2 dilation: 1",
     (7, 7), (3, 7)),
])
def test_conv_output_shape(params, in_hw, out_hw):
    layer = make_layer(f'name: "c" type: "Convolution" convolution_param {{ num_output: 6 {params} }}',
                       [(2, 3, *in_hw)])
    assert layer.top_shapes([(2, 3, *in_hw)]) == [(2, 6, *out_hw)]
    assert tuple(layer(torch.randn(2, 3, *in_hw)).shape) == (2, 6, *out_hw)


@pytest.mark.parametrize("params,in_hw", [
    ("kernel_size: 4 stride: 2 pad: 1", (5, 6)),
    ("kernel_size: 3 stride: 3 dilation: 2", (2, 4)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1", (4, 4)),
])
def test_deconv_output_shape(params, in_hw):
    layer = make_layer(f'name: "d" type: "Deconvolution" convolution_param {{ num_output: 4 {params} }}',
                       [(1, 2, *in_hw)])
    k, s, p, d = layer.kernel, layer.stride, layer.pad, layer.dilation
    want = tuple(s[i] * (in_hw[i] - 1) + d[i] * (k[i] - 1) + 1 - 2 * p[i] for i in range(2))
    assert layer.top_shapes([(1, 2, *in_hw)]) == [(1, 4, *want)]
    assert tuple(layer(torch.randn(1, 2, *in_hw)).shape) == (1, 4, *want)


def test_blob_layouts_and_default_fillers():
    conv = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 6 group: 3 '
                      'kernel_h: 2 kernel_w: 3 }', [(1, 9, 5, 5)])
    assert [tuple(b.shape) for b in conv.blobs] == [(6, 3, 2, 3), (6,)]
    assert not any(b.any() for b in conv.blobs)  # Caffe's default filler is constant 0
    deconv = make_layer('name: "d" type: "Deconvolution" convolution_param { num_output: 6 group: 3 '
                        'kernel_size: 2 bias_term: false }', [(1, 9, 5, 5)])
    assert [tuple(b.shape) for b in deconv.blobs] == [(9, 2, 2, 2)]


def test_fillers_are_used():
    torch.manual_seed(0)
    conv = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 1 '
                      'weight_filler { type: "constant" value: 0.5 } '
                      'bias_filler { type: "constant" value: -1 } }', [(1, 3, 2, 2)])
    assert (conv.blobs[0] == 0.5).all() and (conv.blobs[1] == -1).all()
    y = conv(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(y, torch.full((1, 2, 2, 2), 0.5))


def test_weights_read_each_call():
    conv = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 1 kernel_size: 1 }',
                      [(1, 1, 2, 2)])
    shared = torch.nn.Parameter(torch.full((1, 1, 1, 1), 3.0))
    conv.blobs[0] = shared
    torch.testing.assert_close(conv(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 3.0))


@pytest.mark.parametrize("type_,params,shape,message", [
    ("Convolution", "num_output: 2", (1, 3, 5, 5), "kernel_size (or kernel_h and kernel_w) is required"),
    ("Convolution", "num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5),
     "either kernel_size or kernel_h/kernel_w, not both"),
    ("Convolution", "num_output: 2 kernel_h: 3", (1, 3, 5, 5), "kernel_h and kernel_w must be given together"),
    ("Convolution", "num_output: 2 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5, 5),
     "kernel_h/kernel_w can only be used for 2-D convolution"),
    ("Convolution", "num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 3, 5, 5),
     "kernel_size must be given once or once per spatial dimension (given 3 times for 2"),
    ("Convolution", "num_output: 2 kernel_size: 3 stride: 0", (1, 3, 5, 5), "stride must be positive"),
    ("Convolution", "num_output: 2 kernel_size: 3 stride_w: 2", (1, 3, 5, 5),
     "stride_h and stride_w must be given together"),
    ("Convolution", "num_output: 2 kernel_size: 0", (1, 3, 5, 5), "kernel_size must be positive"),
    ("Im2col", "kernel_size: 3 stride: 0", (1, 3, 5, 5),
     "stride must be positive in every spatial dimension, got [0, 0]"),
    ("Convolution", "kernel_size: 3", (1, 3, 5, 5), "num_output must be set"),
    ("Convolution", "num_output: 4 kernel_size: 3 group: 2", (1, 3, 5, 5),
     "input channels (3) must be a multiple of group (2)"),
    ("Convolution", "num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5),
     "num_output (3) must be a multiple of group (2)"),
    ("Convolution", "num_output: 3 kernel_size: 7", (1, 4, 5, 5), "output size [0, 0] is empty"),
    ("Convolution", "num_output: 3 kernel_size: 1 axis: 4", (1, 4, 5, 5), "axis 4 is out of range"),
    ("Convolution", "num_output: 3 kernel_size: 1", (1, 4, 5, 5, 5, 5), "only 1-D, 2-D and 3-D"),
    ("Convolution", "num_output: 3 kernel_size: 1 weight_filler { type: 'xavier' sparse: 2 }",
     (1, 4, 5, 5), "weight_filler: filler 'xavier' does not support sparse"),
    ("Deconvolution", "num_output: 2 kernel_size: 1 pad: 2", (1, 3, 3, 3), "is empty"),
])
def test_errors(type_, params, shape, message):
    with pytest.raises(LayerError) as e:
        make_layer(f'name: "bad" type: "{type_}" convolution_param {{ {params} }}', [shape])
    assert f"layer 'bad' ({type_})" in str(e.value)
    assert message in str(e.value)


def test_reshape_errors():
    conv = make_layer('name: "c" type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                      [(1, 3, 5, 5)])
    with pytest.raises(LayerError, match="bottom has 4 channels, but the layer was built for 3"):
        conv.top_shapes([(1, 4, 5, 5)])
    text = 'name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "c" convolution_param { num_output: 2 kernel_size: 1 }'
    with pytest.raises(LayerError, match="as many tops as bottoms"):
        make_layer(text, [(1, 3, 5, 5), (1, 3, 5, 5)])


def test_im2col_times_weights_is_the_convolution():
    """Caffe's convolution is W · im2col(x): check Im2col's column order against Convolution."""
    from layer_utils import make_layer
    spec = "kernel_h: 2 kernel_w: 3 stride: 2 pad: 1 dilation: 2"
    conv = make_layer(f'name: "c" type: "Convolution" convolution_param {{ num_output: 4 '
                      f'{spec} bias_term: false weight_filler {{ type: "gaussian" }} }}',
                      [(2, 3, 7, 6)])
    i2c = make_layer(f'name: "i" type: "Im2col" convolution_param {{ {spec} }}', [(2, 3, 7, 6)])
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    cols = i2c.double()(x)                                       # (N, C*kh*kw, oh, ow)
    assert tuple(cols.shape) == i2c.top_shapes([(2, 3, 7, 6)])[0]
    w = conv.double().blobs[0].detach().reshape(4, -1)
    via_cols = torch.einsum("ok,nkhw->nohw", w, cols)
    torch.testing.assert_close(via_cols, conv(x).detach())
