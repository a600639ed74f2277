"""R-FCN's PSROIPooling and the YOLOv2 ports' Reorg against float64 loop re-statements of the
forks' kernels (docs/forks.md), plus float64 gradient checks."""
import math

import numpy as np
import pytest
import torch

from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer

F32 = np.float32


def c_round(v):
    """C's round on a float32 value: halves away from zero."""
    return F32(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))


def psroi_reference(x, rois, scale, dim, k):
    """One output element at a time, as the fork's forward loop: float32 geometry, float64 sums."""
    n, c, h, w = x.shape
    out = np.zeros((len(rois), dim, k, k))
    for r, roi in enumerate(rois.astype(F32)):
        b = int(roi[0])
        x0 = c_round(roi[1]) * F32(scale)
        y0 = c_round(roi[2]) * F32(scale)
        x1 = F32(c_round(roi[3]) + F32(1)) * F32(scale)
        y1 = F32(c_round(roi[4]) + F32(1)) * F32(scale)
        bw = max(F32(x1 - x0), F32(0.1)) / F32(k)
        bh = max(F32(y1 - y0), F32(0.1)) / F32(k)
        for d in range(dim):
            for i in range(k):
                for j in range(k):
                    hs = min(max(int(math.floor(F32(F32(i) * bh) + y0)), 0), h)
                    he = min(max(int(math.ceil(F32(F32(i + 1) * bh) + y0)), 0), h)
                    ws = min(max(int(math.floor(F32(F32(j) * bw) + x0)), 0), w)
                    we = min(max(int(math.ceil(F32(F32(j + 1) * bw) + x0)), 0), w)
                    if he <= hs or we <= ws:
                        continue
                    channel = (d * k + i) * k + j
                    total = 0.0
                    for yy in range(hs, he):
                        for xx in range(ws, we):
                            total += float(x[b, channel, yy, xx])
                    out[r, d, i, j] = total / ((he - hs) * (we - ws))
    return out


PSROI = ('name: "ps" type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.25 '
         'output_dim: 2 group_size: 3 }')
# Regions: an ordinary one, one reaching past the right and bottom edges (and one starting
# left of the map, whose first bins are empty), a tiny one (one image pixel, a quarter of a
# feature pixel: every bin floor/ceils to one pixel), one with .5 corners (C rounding), one
# on image 1, and an inverted one (its size raised to 0.1).
ROIS = np.array([[0, 4, 6, 30, 25], [1, 20, 10, 60, 70], [0, -9, -3, 12, 14],
                 [1, 13, 9, 13, 9], [0, 2.5, 5.5, 21.5, 17.5], [1, 0, 0, 35, 27],
                 [0, 20, 18, 10, 10]], dtype=F32)


def test_psroi_pooling_matches_fork_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 18, 7, 9, generator=g)
    layer = make_layer(PSROI, [x.shape, ROIS.shape])
    assert layer.top_shapes([x.shape, ROIS.shape]) == [(7, 2, 3, 3)]
    out = layer(x, torch.from_numpy(ROIS))
    expected = psroi_reference(x.double().numpy(), ROIS, 0.25, 2, 3)
    assert out.shape == (7, 2, 3, 3) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert (expected[2] == 0).sum() > 0     # bins left of the map are clipped empty: zeros
    assert (expected[3] != 0).all()         # the tiny region's bins still hold a pixel


def test_psroi_pooling_float64_gradient():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 18, 7, 9, generator=g, dtype=torch.float64)
    layer = make_layer(PSROI, [x.shape, ROIS.shape])
    gradcheck_layer(layer, [x, torch.from_numpy(ROIS).double()])


def test_psroi_pooling_gradient_is_the_forks_average_spread():
    x = torch.zeros(1, 4, 4, 4, requires_grad=True)
    layer = make_layer('name: "ps" type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 '
                       'output_dim: 1 group_size: 2 }', [x.shape, (1, 5)])
    out = layer(x, torch.tensor([[0, 0, 0, 2, 2.]]))       # 3 x 3 region: bins 2 wide
    out.backward(torch.ones_like(out))
    # bin (0, 0): rows [0, 2) cols [0, 2); bin (1, 1): rows [1, 3) cols [1, 3), 4 pixels each
    assert torch.allclose(x.grad[0, 0, :2, :2], torch.full((2, 2), 0.25))
    assert torch.allclose(x.grad[0, 3, 1:3, 1:3], torch.full((2, 2), 0.25))
    assert x.grad.sum().item() == pytest.approx(4.0)


def test_psroi_pooling_checks_channels():
    with pytest.raises(LayerError, match="output_dim"):
        make_layer(PSROI, [(1, 17, 5, 5), (1, 5)])


def reorg_reference(x, stride, reverse):
    """Darknet's reorg_cpu loop over the bottom's [C, H, W], on flat per-batch buffers."""
    n, c, h, w = x.shape
    out_c = c // (stride * stride)
    src = x.reshape(n, -1)
    dst = np.zeros_like(src)
    for b in range(n):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    here = i + w * (j + h * k)
                    c2, offset = k % out_c, k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    there = w2 + w * stride * (h2 + h * stride * c2)
                    if reverse:
                        dst[b, there] = src[b, here]
                    else:
                        dst[b, here] = src[b, there]
    if reverse:
        return dst.reshape(n, out_c, h * stride, w * stride)
    return dst.reshape(n, c * stride * stride, h // stride, w // stride)


def reorg(stride, reverse=False):
    flag = "true" if reverse else "false"
    return f'name: "r" type: "Reorg" reorg_param {{ stride: {stride} reverse: {flag} }}'


@pytest.mark.parametrize("shape,stride", [((2, 8, 4, 6), 2), ((1, 9, 6, 3), 3), ((1, 4, 2, 2), 2)])
@pytest.mark.parametrize("reverse", [False, True])
def test_reorg_matches_darknet_loop(shape, stride, reverse):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    layer = make_layer(reorg(stride, reverse), [shape])
    out = layer(torch.from_numpy(x))
    expected = reorg_reference(x, stride, reverse)
    assert tuple(out.shape) == layer.top_shapes([shape])[0] == expected.shape
    np.testing.assert_array_equal(out.numpy(), expected)


def test_reorg_is_not_plain_space_to_depth():
    x = torch.arange(64.).view(1, 4, 4, 4)
    out = make_layer(reorg(2), [x.shape])(x)
    assert not torch.equal(out, torch.nn.functional.pixel_unshuffle(x, 2))


def test_reorg_reverse_undoes_forward_memory_order():
    """Darknet's reverse on a bottom of one shape is the inverse permutation of its forward on
    that shape: a forward top read back as that shape comes back to the input's memory."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 4, 6, generator=g)
    forward = make_layer(reorg(2), [x.shape])(x)
    back = make_layer(reorg(2, True), [x.shape])(forward.reshape(x.shape))
    assert torch.equal(back.reshape(x.shape), x)


@pytest.mark.parametrize("reverse", [False, True])
def test_reorg_float64_gradient(reverse):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64)
    gradcheck_layer(make_layer(reorg(2, reverse), [x.shape]), [x])


def test_reorg_checks_shapes():
    with pytest.raises(LayerError, match="multiple of stride"):
        make_layer(reorg(2), [(1, 6, 4, 4)])
    with pytest.raises(LayerError, match="multiples of stride"):
        make_layer(reorg(2), [(1, 8, 5, 4)])
    with pytest.raises(LayerError, match="stride must be set"):
        make_layer('name: "r" type: "Reorg"', [(1, 8, 4, 4)])
