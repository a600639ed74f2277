"""Shape-specialised layer calls of the fused plan (Layer.specialized, engine/layers/fast_forms.py)
equal the layers."""
import math

import pytest
import torch

from caffe_compat.engine.layers.base import TEST
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import build_net
from google.protobuf import text_format
from caffe_compat.proto import caffe_pb2

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 13 dim: 11 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "perm" type: "Permute" bottom: "pool" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "flat" type: "Reshape" bottom: "perm" top: "flat" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "sm" type: "Softmax" bottom: "flat" top: "sm" softmax_param { axis: -1 } }
layer { name: "fl" type: "Flatten" bottom: "pool" top: "fl" }
layer { name: "ip" type: "InnerProduct" bottom: "fl" top: "ip"
  inner_product_param { num_output: 7 transpose: true weight_filler { type: "gaussian" std: 0.1 }
                        bias_filler { type: "gaussian" std: 1 } } }
"""


def _net():
    param = text_format.Parse(NET, caffe_pb2.NetParameter())
    return build_net(param, TEST)


def test_fused_net_with_specialised_ops_equals_the_layers():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        want = net(data=x)
        fused = fused_for_inference(net)
        got = fused.outputs(data=x)
    kinds = {getattr(op.call, "__name__", "") for op in fused.ops}
    assert {"prelu", "max_pool", "reshape", "softmax", "linear"} <= kinds
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_a_rewrite_of_a_specialised_step_keeps_its_form():
    """Plan passes rebuild steps with ``dataclasses.replace`` (the engine split did, and
    exported the plain layers): the specialised call is a field, so it survives."""
    from dataclasses import replace
    fused = fused_for_inference(_net())
    special = [s for s in fused.plan if s.specialized is not None]
    assert special
    for step in special:
        again = replace(step, release=())
        assert again.call is step.call is step.specialized


def test_other_shape_or_dtype_goes_to_the_layer():
    net = _net()
    index = net.layer_names.index("pool")
    layer = net.layers[index]
    fast = layer.specialized([net.blob_shapes["conv"]])
    planned = torch.randn(2, 6, 11, 9)
    planned[0, :, :4, :4] = -math.inf          # all -inf windows: Caffe's -FLT_MAX
    torch.testing.assert_close(fast(planned), layer.forward(planned), rtol=0, atol=0)
    assert float(fast(planned).min()) == pytest.approx(-3.4028234663852886e38)
    y = torch.randn(1, 6, 9, 9)                        # not the planned shape
    torch.testing.assert_close(fast(y), layer.forward(y))
    z = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    torch.testing.assert_close(fast(z), layer.forward(z))


def test_slopes_written_in_place_are_seen():
    net = _net()
    layer = net.layers[net.layer_names.index("prelu")]
    fast = layer.specialized([net.blob_shapes["conv"]])
    x = -torch.ones(2, 6, 11, 9)
    with torch.no_grad():
        layer.blobs[0].fill_(0.125)
    assert float(fast(x).max()) == pytest.approx(-0.125)


@pytest.mark.parametrize("rows, width", [(300, 2), (200, 7), (64, 2), (300, 16)])
def test_softmax_over_a_narrow_last_axis(rows, width):
    text = ('name: "sm" layer { name: "data" type: "Input" top: "data" input_param { shape { '
            f'dim: 1 dim: {rows} dim: {width} }} }} }}\n'
            'layer { name: "sm" type: "Softmax" bottom: "data" top: "sm" '
            'softmax_param { axis: 2 } }')
    net = build_net(text_format.Parse(text, caffe_pb2.NetParameter()), TEST)
    layer = net.layers[net.layer_names.index("sm")]
    fast = layer.specialized([(1, rows, width)])
    x = torch.randn(1, rows, width, generator=torch.Generator().manual_seed(5)) * 20
    got = fast(x)
    exact = torch.softmax(x.double(), 2)
    assert got.is_contiguous() and got.shape == x.shape
    # as close to float64 as the layer's own kernel, and equal to it within float32 rounding
    assert float((got - exact).abs().max()) <= 2 * max(
        float((layer.forward(x) - exact).abs().max()), 1e-8)
    torch.testing.assert_close(got, layer.forward(x), rtol=1e-6, atol=1e-7)
    assert fast.__qualname__.startswith("_softmax_moved") == (rows >= 128 and width < 16)
    torch.testing.assert_close(fast(x[:, :10]), layer.forward(x[:, :10]))   # another shape
