"""Winograd F(4x4, 3x3) (engine/net/winograd.py): exact algebra, fp32 accuracy as good as the
direct convolution's, and the fused net's outputs unchanged."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe_compat.engine.net import winograd
from caffe_compat.engine.net.fuse import FoldedLinear, fused_for_inference

from test_fuse import assert_close, build, vgg_style


@pytest.mark.parametrize("tile", [4, 2])
def test_transforms_compute_a_correlation_exactly(tile):
    at, g, bt = winograd.transforms(tile)
    assert at.shape == (tile, tile + 2) and g.shape == (tile + 2, 3) and bt.shape == (tile + 2,) * 2
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, k = rng.standard_normal(tile + 2), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ k for i in range(tile)])
        np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), want, rtol=0, atol=1e-12)
    assert np.array_equal(bt * 2, np.round(bt * 2))       # exact halves: a cheap, exact B^T


def _relative_error(got, x, w, b, pad):
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=pad)
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("n,c,co,h,w,pad,bias", [
    (1, 64, 128, 28, 28, (1, 1), True),      # the VGG case
    (2, 8, 5, 13, 10, (1, 1), True),         # sizes off the 4x4 tile grid, a batch
    (1, 6, 7, 9, 11, (0, 0), False),         # no padding, no bias
    (1, 4, 3, 7, 8, (2, 1), True),           # unequal, wider padding
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("tile", [4, 2])
def test_conv3x3_matches_float64_as_closely_as_the_direct_kernel(n, c, co, h, w, pad, bias,
                                                                  layout, tile):
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(n, c, h, w, generator=gen)).contiguous(memory_format=layout)
    weight = torch.randn(co, c, 3, 3, generator=gen) * 0.1
    b = torch.randn(co, generator=gen) if bias else None
    with torch.no_grad():
        got = winograd.conv3x3(x, winograd.weight_transform(weight, tile), b, pad)
        direct = F.conv2d(x, weight, b, padding=pad)
    assert got.shape == direct.shape
    err, direct_err = (_relative_error(t, x, weight, b, pad) for t in (got, direct))
    # a few rounding steps more than the direct sum: within 4x its error (or 2e-6 on the
    # tiny layers whose direct error is near one rounding)
    assert err < max(4 * direct_err, 2e-6), (err, direct_err)


@pytest.mark.parametrize("tile", [4, 2])
def test_bands_give_the_same_result(monkeypatch, tile):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 30, 30, generator=gen)
    u = winograd.weight_transform(torch.randn(32, 16, 3, 3, generator=gen), tile)
    b = torch.randn(32, generator=gen)
    with torch.no_grad():
        whole = winograd.conv3x3(x, u, b, (1, 1))
        monkeypatch.setattr(winograd, "MIN_BAND_BYTES", 1)      # one tile row per band
        banded = winograd.conv3x3(x, u, b, (1, 1))
    assert torch.equal(whole, banded)


def _tile(weight, x, stride=(1, 1), dilation=(1, 1), groups=1):
    return winograd.tile_for(weight, stride, dilation, groups, x)


def test_tile_choice(monkeypatch):
    w, x = torch.zeros(128, 64, 3, 3), torch.zeros(1, 64, 28, 28)
    with torch.no_grad():
        assert _tile(w, x) == 4
        assert _tile(torch.zeros(256, 256, 3, 3), torch.zeros(1, 256, 14, 14)) == 2
        assert _tile(torch.zeros(512, 512, 3, 3), torch.zeros(1, 512, 7, 7)) == 0
        assert not _tile(w, x, stride=(2, 2)) and not _tile(w, x, dilation=(2, 2))
        assert not _tile(torch.zeros(128, 32, 3, 3), torch.zeros(1, 64, 28, 28), groups=2)
        assert not _tile(torch.zeros(128, 64, 5, 5), x) and not _tile(w, x.double())
        assert not _tile(torch.zeros(64, 64, 3, 3), torch.zeros(1, 64, 56, 56))   # thin
        assert _tile(torch.zeros(64, 64, 3, 3), torch.zeros(1, 64, 112, 112)) == 4
        monkeypatch.setenv("CAFFE_COMPAT_WINOGRAD", "on")
        assert _tile(torch.zeros(8, 4, 3, 3), torch.zeros(1, 4, 56, 56)) == 4
        assert _tile(torch.zeros(8, 4, 3, 3), torch.zeros(1, 4, 7, 7)) == 2
        monkeypatch.setenv("CAFFE_COMPAT_WINOGRAD", "off")
        assert not _tile(w, x)
        monkeypatch.setenv("CAFFE_COMPAT_WINOGRAD", "fast")
        with pytest.raises(ValueError, match="CAFFE_COMPAT_WINOGRAD='fast'"):
            _tile(w, x)
    monkeypatch.setenv("CAFFE_COMPAT_WINOGRAD", "on")
    assert not _tile(w, x)        # autograd on: the transformed weights have no gradient


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size,tile", [(12, 2), (20, 4)])
def test_fused_net_with_winograd_equals_unfused(monkeypatch, channels_last, size, tile):
    monkeypatch.setenv("CAFFE_COMPAT_WINOGRAD", "on")
    net = build(vgg_style().replace("dim: 12 dim: 12", f"dim: {size} dim: {size}"))
    x = torch.randn(*net.blob_shapes["data"], generator=torch.Generator().manual_seed(5))
    fused = fused_for_inference(net, channels_last=channels_last)
    with torch.no_grad():
        out = fused.outputs(data=x)
        ref = net(data=x)
    convs = [op.fn for op in fused.ops if isinstance(op.fn, FoldedLinear) and op.fn.kind ==
             "Convolution"]
    assert len(convs) == 3 and all(list(c._winograd_u) == [tile] for c in convs)
    assert_close(out, ref)
    monkeypatch.setenv("CAFFE_COMPAT_WINOGRAD", "off")
    with torch.no_grad():
        direct = fused_for_inference(net, channels_last=channels_last).outputs(data=x)
    assert not torch.equal(direct["fc7"], out["fc7"])          # the two paths really differ
