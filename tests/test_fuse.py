"""Inference fusion (engine/net/fuse.py): folded nets compute the unfused net's outputs."""
import pytest
import torch

from caffe_compat.engine.layers.base import TEST, TRAIN
from caffe_compat.engine.net.frozen import frozen_for_inference
from caffe_compat.engine.net.fuse import (FoldedLinear, InPlaceReLU, InPlaceSum, fusable,
                                          fused_for_inference)
from caffe_compat.engine.net.inference_cache import InferenceCache
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2


def _conv(name, bottom, n, k=3, pad=1, stride=1, bias=True, top=None):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} stride: {stride} '
            f'bias_term: {"true" if bias else "false"} weight_filler {{ type: "msra" }} '
            'bias_filler { type: "gaussian" std: 0.1 } } }\n')


def _bn_scale(name, blob, relu=True):
    text = (f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{blob}" top: "{blob}" }}\n'
            f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{blob}" top: "{blob}" '
            'scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } '
            'bias_filler { type: "gaussian" std: 0.2 } } }\n')
    if relu:
        text += f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'
    return text


def resnet_style() -> str:
    text = ('name: "tiny_resnet" layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } } }\n')
    text += _conv("conv1", "data", 8, bias=False) + _bn_scale("conv1", "conv1")
    text += _conv("b1", "conv1", 8, bias=False) + _bn_scale("b1", "b1")
    text += _conv("b2", "b1", 8, bias=False) + _bn_scale("b2", "b2", relu=False)
    text += _conv("proj", "conv1", 8, k=1, pad=0, bias=False) + _bn_scale("proj", "proj", False)
    text += ('layer { name: "sum" type: "Eltwise" bottom: "proj" bottom: "b2" top: "sum" }\n'
             'layer { name: "relu_sum" type: "ReLU" bottom: "sum" top: "sum" }\n')
    # Not in place, with a separate Bias layer and a leaky ReLU: still one folded conv.
    text += _conv("c3", "sum", 6, stride=2)
    text += ('layer { name: "bn3" type: "BatchNorm" bottom: "c3" top: "c3n" }\n'
             'layer { name: "bias3" type: "Bias" bottom: "c3n" top: "c3b" '
             'bias_param { filler { type: "gaussian" std: 0.3 } } }\n'
             'layer { name: "lrelu3" type: "ReLU" bottom: "c3b" top: "c3r" '
             'relu_param { negative_slope: 0.1 } }\n'
             'layer { name: "pool" type: "Pooling" bottom: "c3r" top: "pool" '
             'pooling_param { pool: AVE global_pooling: true } }\n'
             'layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" '
             'inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }\n'
             'layer { name: "bn_fc" type: "BatchNorm" bottom: "fc" top: "fc" }\n'
             'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    return text


def vgg_style() -> str:
    text = ('name: "tiny_vgg" layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 3 dim: 3 dim: 12 dim: 12 } } }\n')
    bottom = "data"
    for i, n in enumerate((8, 8, 12)):
        text += _conv(f"conv{i}", bottom, n)
        text += f'layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}\n'
        bottom = f"conv{i}"
    text += ('layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" '
             'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
             'layer { name: "fc6" type: "InnerProduct" bottom: "pool" top: "fc6" '
             'inner_product_param { num_output: 16 weight_filler { type: "xavier" } '
             'bias_filler { type: "gaussian" std: 0.1 } transpose: true } }\n'
             'layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }\n'
             'layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }\n'
             'layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" '
             'inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }\n')
    return text


def build(text, phase=TEST):
    torch.manual_seed(0)
    net = build_net(read_text_proto(text, caffe_pb2.NetParameter), phase, source="<test>")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in net.layers:
            if layer.type == "BatchNorm":    # random statistics, factor as after training
                c = layer.channels
                factor = 0.5 + torch.rand(1, generator=gen) * 10
                layer.blobs[0].copy_(torch.randn(c, generator=gen) * factor)
                layer.blobs[1].copy_((0.2 + torch.rand(c, generator=gen) * 3) * factor)
                layer.blobs[2].copy_(factor)
    return net


def assert_close(fused_out, ref, rel=1e-5):
    for name, want in ref.items():
        scale = max(1.0, float(want.abs().max()))
        diff = float((fused_out[name] - want).abs().max())
        assert diff <= rel * scale, f"{name}: max abs diff {diff:g} (scale {scale:g})"


@pytest.mark.parametrize("text,folded", [(resnet_style(), 6), (vgg_style(), 4)])
def test_fused_outputs_equal_unfused(text, folded):
    net = build(text)
    x = torch.randn(*net.blob_shapes["data"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(data=x)
        fused = fused_for_inference(net)
        out = fused.outputs(data=x)
    assert sum(isinstance(op.fn, FoldedLinear) for op in fused.ops) == folded
    assert set(out) == set(ref) == set(net.output_names)
    assert_close(out, ref)


def test_resnet_fusion_drops_the_affine_layers():
    fused = fused_for_inference(build(resnet_style()))
    names = [op.fn.name for op in fused.ops if op.fn is not None and
             not isinstance(op.fn, (FoldedLinear, InPlaceReLU, InPlaceSum))]
    assert not [n for n in names if n.startswith(("bn", "scale", "bias", "relu", "lrelu"))]
    assert "sum" not in names        # the residual sum accumulates into a folded conv output
    assert [op.fn.layer_name for op in fused.ops if isinstance(op.fn, InPlaceSum)] == ["sum"]
    # Eltwise's ReLU has no conv to join: it runs in place on the sum, which nothing else reads
    assert [op.fn.layer_name for op in fused.ops if isinstance(op.fn, InPlaceReLU)] == ["relu_sum"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_sum_stays_out_of_place_when_its_input_is_read_later(channels_last):
    # c (a folded conv) is read by s and again by t after s: accumulating s into c would
    # change t; d is read once, so s may accumulate into it (two bottoms: either one).
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 '
            'dim: 5 dim: 5 } } }\n' + _conv("c", "data", 3) + _bn_scale("c", "c", False) +
            _conv("d", "data", 3) + _bn_scale("d", "d", False) +
            'layer { name: "s" type: "Eltwise" bottom: "c" bottom: "d" top: "s" }\n'
            'layer { name: "t" type: "Eltwise" bottom: "c" bottom: "s" top: "t" }\n')
    net = build(text)
    fused = fused_for_inference(net, channels_last=channels_last)
    sums = {op.fn.layer_name: op.fn.into for op in fused.ops if isinstance(op.fn, InPlaceSum)}
    assert sums == {"s": 1}
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        assert_close(fused.outputs(data=x), net(data=x))


def test_relu_stays_out_of_place_when_its_input_is_read_elsewhere():
    # s feeds the ReLU and the second Eltwise: an in-place ReLU would change s2.
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 '
            'dim: 5 dim: 5 } } }\n' + _conv("a", "data", 3) + _conv("b", "data", 3) +
            'layer { name: "s" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }\n'
            'layer { name: "r" type: "ReLU" bottom: "s" top: "r" }\n'
            'layer { name: "s2" type: "Eltwise" bottom: "s" bottom: "r" top: "s2" }\n'
            'layer { name: "p" type: "Pooling" bottom: "s2" top: "p" '
            'pooling_param { pool: MAX kernel_size: 2 stride: 1 } }\n'
            'layer { name: "r2" type: "ReLU" bottom: "p" top: "p" '
            'relu_param { negative_slope: 0.2 } }\n')
    net = build(text)
    fused = fused_for_inference(net)
    assert [op.fn.layer_name for op in fused.ops if isinstance(op.fn, InPlaceReLU)] == ["r2"]
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        assert_close(fused.outputs(data=x), net(data=x))


def test_original_net_untouched_and_exposes_every_blob():
    net = build(resnet_style())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(*net.blob_shapes["data"])
    with torch.no_grad():
        ref = net.run({"data": x})
        fused_for_inference(net).outputs(data=x)
        again = net.run({"data": x})
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(again) == set(ref) and "b1" in again
    for k in ref:
        assert torch.equal(again[k], ref[k]), k


def test_output_or_fan_out_blob_is_not_folded_away():
    # c feeds two BatchNorms (a Split), so it stays; d folds with bnd, whose top fans out.
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 '
            'dim: 5 dim: 5 } } }\n' + _conv("c", "data", 3) +
            'layer { name: "bn1" type: "BatchNorm" bottom: "c" top: "n1" }\n'
            'layer { name: "bn2" type: "BatchNorm" bottom: "c" top: "n2" }\n' +
            _conv("d", "data", 3) +
            'layer { name: "bnd" type: "BatchNorm" bottom: "d" top: "nd" }\n'
            'layer { name: "r" type: "ReLU" bottom: "nd" top: "r" }\n'
            'layer { name: "s" type: "Eltwise" bottom: "nd" bottom: "r" top: "s" }\n')
    net = build(text)
    x = torch.randn(1, 2, 5, 5)
    fused = fused_for_inference(net)
    assert [op.fn.layer_name for op in fused.ops if isinstance(op.fn, FoldedLinear)] == ["d"]
    assert "c" in [getattr(op.fn, "name", None) for op in fused.ops]
    with torch.no_grad():
        assert_close(fused.outputs(data=x), net(data=x))


def test_batch_statistics_are_not_folded():
    text = resnet_style().replace('type: "BatchNorm" bottom: "b1" top: "b1" }',
                                  'type: "BatchNorm" bottom: "b1" top: "b1" '
                                  'batch_norm_param { use_global_stats: false } }')
    net = build(text)
    fused = fused_for_inference(net)
    assert "bn_b1" in [op.fn.name for op in fused.ops if isinstance(op.fn, torch.nn.Module)
                       and not isinstance(op.fn, (FoldedLinear, InPlaceReLU, InPlaceSum))]


def test_inference_cache_refuses_stale_weights():
    net = build(vgg_style())
    cache = InferenceCache(net)
    x = torch.randn(*net.blob_shapes["data"])
    first = cache.outputs(data=x)["fc7"]
    fused_once = cache.fused
    with torch.no_grad():
        net.layers[net.layer_index("conv0")].blobs[0].mul_(2.0)   # bumps the version
        ref = net(data=x)["fc7"]
    again = cache.outputs(data=x)["fc7"]
    assert cache.fused is not fused_once
    assert not torch.allclose(first, again)
    assert torch.allclose(again, ref, atol=1e-5)
    assert cache.fused is cache.fused                      # no change: no re-fusion


def test_inference_cache_keeps_channels_last_after_a_bad_input():
    """An input no layout can run (smaller than a kernel) fails in NCHW too: the error is
    the input's, and the cache stays channels-last for the good inputs after it."""
    net = build(vgg_style())
    cache = InferenceCache(net)
    x = torch.randn(*net.blob_shapes["data"])
    cache.outputs(data=x)
    assert cache.channels_last
    with pytest.raises(RuntimeError):
        cache.outputs(data=x[..., :1, :1])
    assert cache.channels_last
    with torch.no_grad():
        assert torch.allclose(cache.outputs(data=x)["fc7"], net(data=x)["fc7"], atol=1e-5)


def test_frozen_torchscript_equals_unfused():
    net = build(resnet_style())
    x = torch.randn(*net.blob_shapes["data"])
    frozen = frozen_for_inference(fused_for_inference(net), [x])
    with torch.no_grad():
        ref = net(data=x)
        out = dict(zip(net.output_names, frozen(x)))
    assert_close(out, ref)


def test_missing_input_is_named():
    fused = fused_for_inference(build(vgg_style()))
    with pytest.raises(KeyError, match="data"):
        fused.outputs()


def test_train_phase_batchnorm_stays():
    net = build(resnet_style(), phase=TRAIN)
    assert not fusable(net) and fusable(build(resnet_style()))
    fused = fused_for_inference(net)
    assert all(op.fn.type != "BatchNorm" or not op.fn.use_global_stats
               for op in fused.ops if op.fn is not None and hasattr(op.fn, "type"))


@pytest.mark.parametrize("text", [resnet_style(), vgg_style()])
def test_channels_last_fused_equals_unfused(text):
    net = build(text)
    x = torch.randn(*net.blob_shapes["data"])
    fused = fused_for_inference(net, channels_last=True)
    convs = [op.fn for op in fused.ops if isinstance(op.fn, FoldedLinear) and op.fn.weight.dim() == 4]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert net.layers[net.layer_index("conv1" if "conv1" in net.layer_names else "conv0")
                      ].blobs[0].is_contiguous()            # the original keeps NCHW
    with torch.no_grad():
        assert_close(fused.outputs(data=x), net(data=x))
