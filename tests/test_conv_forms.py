"""Convolution forms chosen by timing (engine/net/conv_forms.py): every form computes the
convolution F.conv2d computes, in the layout the plan expects, and a measured fused net gives
the unfused net's outputs whatever form each layer took."""
import pytest
import torch
import torch.nn.functional as F

from caffe_compat.engine.net import conv_forms
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

GEOMETRIES = [  # (cin, cout, k, stride, pad, dilation, groups, size)
    (1, 20, 5, 1, 0, 1, 1, 28), (3, 8, 3, 2, 1, 1, 1, 17), (8, 8, 3, 1, 1, 1, 8, 12),
    (6, 4, 1, 1, 0, 1, 2, 9), (4, 6, 3, 1, 2, 2, 1, 11), (16, 32, 2, 1, 0, 1, 1, 5)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("slope", [None, 0.0, 0.1])
def test_every_form_is_the_convolution(geometry, layout, slope):
    cin, cout, k, s, p, d, g, size = geometry
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, size, size, generator=gen).contiguous(memory_format=layout)
    w, b = torch.randn(cout, cin // g, k, k, generator=gen), torch.randn(cout, generator=gen)
    args = dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=g)
    direct = lambda t: F.conv2d(t, w, b, s, p, d, g)   # noqa: E731
    want = direct(x)
    planned = want.stride()
    forms = conv_forms.candidates(direct, w, b, args, x, want, slope)
    assert {"direct", "nchw", "nhwc"} <= set(forms)
    assert ("im2col" in forms) == (g == 1 and d == 1)
    if slope is not None:
        want = F.leaky_relu(want, slope)
    for name, (form, rectifies) in forms.items():
        got = form(x)
        if slope is not None and not rectifies:
            got = F.leaky_relu(got, slope)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
        assert got.stride() == planned, name          # laid out as the plan expects


def test_large_convolutions_keep_their_own_path():
    x = torch.randn(1, 64, 64, 64)
    w = torch.randn(128, 64, 3, 3)
    args = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    assert 128 * 64 * 9 * 64 * 64 > conv_forms.MEASURE_MACS
    assert conv_forms.choose(lambda t: F.conv2d(t, w, None, 1, 1), w, None, args, None,
                             x) is None


def _lenet_like(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(
        'name: "small" layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 1 dim: 1 dim: 20 dim: 20 } } }\n'
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
        'convolution_param { num_output: 8 kernel_size: 5 weight_filler { type: "msra" } '
        'bias_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }\n'
        'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
        'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
        'layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" '
        'convolution_param { num_output: 12 kernel_size: 3 pad: 1 weight_filler { type: "msra" } '
        'bias_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }\n'
        # two InnerProducts on the NHWC map: one folded with its ReLU, one on its own
        'layer { name: "ipa" type: "InnerProduct" bottom: "conv2" top: "ipa" '
        'inner_product_param { num_output: 5 weight_filler { type: "xavier" } '
        'bias_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "relua" type: "ReLU" bottom: "ipa" top: "ipa" }\n'
        'layer { name: "ipb" type: "InnerProduct" bottom: "conv2" top: "ipb" '
        'inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }\n')
    torch.manual_seed(0)
    return build_net(read_text_proto(str(path), caffe_pb2.NetParameter), caffe_pb2.TEST,
                     source=str(path)).eval()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("forced", [None, "nchw", "nhwc", "im2col", "packed"])
def test_measured_net_equals_the_net(tmp_path, monkeypatch, channels_last, forced):
    if forced is not None:                # this form wherever it exists, whatever the timing
        monkeypatch.setattr(conv_forms, "_CHOICES", {})
        monkeypatch.setattr(conv_forms, "fastest",
                            lambda forms, x: forced if forced in forms else "direct")
    net = _lenet_like(tmp_path)
    measured = fused_for_inference(net, channels_last=channels_last, measure=True)
    convs = [s.fn for s in measured.plan if s.name in ("conv1", "conv2")]
    assert len(convs) == 2 and not any(c.choose_form for c in convs)
    if forced in ("nchw", "nhwc", "im2col"):
        assert all(c._form is not None for c in convs)
    x = torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(3))
    if channels_last:
        assert [s.fn._form[3] for s in measured.plan if s.name == "ipa"] == ["nhwc columns"]
    with torch.no_grad():
        want = net(data=x)
        for name, got in measured.outputs(data=x).items():
            torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-5)
        two = torch.cat([x, x])                       # another shape: the layer's own path
        for name, got in measured.outputs(data=two).items():
            torch.testing.assert_close(got, want[name].expand(2, -1), rtol=1e-5, atol=1e-5)


def test_nhwc_ordered_weights_follow_in_place_changes(tmp_path):
    net = _lenet_like(tmp_path)
    fused = fused_for_inference(net, channels_last=True, measure=True)
    x = torch.randn(1, 1, 20, 20, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = fused.outputs(data=x)["ipb"]
        net.layers[net.layer_index("ipb")].blobs[0].mul_(-2.0)    # the layer's own blob
        torch.testing.assert_close(fused.outputs(data=x)["ipb"], net(data=x)["ipb"],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, net(data=x)["ipb"].detach())
