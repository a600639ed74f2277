"""Fork layers against float64 references written from the forks' formulas (docs/forks.md).

SSD's layers and ReLU6 are also checked against real Caffe in test_layers_golden.py.
"""
import math

import numpy as np
import pytest
import torch

from caffe_compat.engine.layers import LayerError
from layer_utils import FWD, make_layer

rng = np.random.default_rng(0)


def t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_bn_learn_uses_batch_statistics_and_its_own_scale_shift():
    x = rng.normal(size=(3, 2, 4, 5))
    layer = make_layer('name: "bn" type: "BN" top: "y" top: "m" top: "v" bn_param { '
                       'scale_filler { type: "constant" value: 2 } '
                       'shift_filler { type: "constant" value: 0.5 } }', [x.shape]).double()
    y, mean, var = layer(t(x))
    m = x.mean(axis=(0, 2, 3), keepdims=True)
    v = (x ** 2).mean(axis=(0, 2, 3), keepdims=True) - m ** 2
    np.testing.assert_allclose(y.detach().numpy(), 2 * (x - m) / np.sqrt(v + 1e-9) + 0.5, rtol=1e-9)
    np.testing.assert_allclose(mean.detach().numpy(), m.reshape(1, 2, 1, 1), rtol=1e-12)
    np.testing.assert_allclose(var.detach().numpy(), v.reshape(1, 2, 1, 1), rtol=1e-9)
    assert [tuple(b.shape) for b in layer.blobs] == [(1, 2, 1, 1), (1, 2, 1, 1)]


def test_bn_inference_is_scale_and_shift_only():
    x = rng.normal(size=(2, 3, 2, 2))
    layer = make_layer('name: "bn" type: "BN" bn_param { bn_mode: INFERENCE }', [x.shape]).double()
    with torch.no_grad():
        layer.blobs[0].copy_(t([1.5, -1, 3]).view(1, 3, 1, 1))
        layer.blobs[1].copy_(t([0.1, 0.2, 0.3]).view(1, 3, 1, 1))
    expected = x * np.array([1.5, -1, 3]).reshape(1, 3, 1, 1) + np.array([.1, .2, .3]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(layer(t(x)).detach().numpy(), expected, rtol=1e-12)
    assert not make_layer('name: "b" type: "BN"', [x.shape]).blobs[0].detach().any()  # Caffe's default filler: 0


def test_upsample_scatters_pooled_values_at_the_mask():
    x = rng.normal(size=(1, 2, 3, 3))
    pool = make_layer('name: "p" type: "Pooling" top: "p" top: "mask" pooling_param '
                      '{ pool: MAX kernel_size: 2 stride: 2 }', [(1, 2, 5, 6)]).double()
    values, mask = pool(t(rng.normal(size=(1, 2, 5, 6))))
    up = make_layer('name: "u" type: "Upsample" upsample_param { upsample_h: 5 upsample_w: 6 }',
                    [values.shape, mask.shape]).double()
    out = up(t(x), mask).detach().numpy()
    expected = np.zeros((1, 2, 30))
    for c in range(2):
        for i, idx in enumerate(mask[0, c].numpy().reshape(-1)):
            expected[0, c, int(idx)] = x[0, c].reshape(-1)[i]
    np.testing.assert_array_equal(out, expected.reshape(1, 2, 5, 6))
    scaled = make_layer('name: "u" type: "Upsample" upsample_param { scale: 2 pad_out_h: true }',
                        [(1, 2, 3, 3), (1, 2, 3, 3)])
    assert scaled.top_shapes([(1, 2, 3, 3)] * 2) == [(1, 2, 5, 6)]


def test_upsample_duplicate_index_last_wins_and_both_get_the_gradient():
    x = t([[[[1.0, 2.0]]]]).requires_grad_()
    mask = t([[[[3.0, 3.0]]]])
    up = make_layer('name: "u" type: "Upsample" upsample_param { upsample_h: 2 upsample_w: 2 }',
                    [(1, 1, 1, 2)] * 2).double()
    out = up(x, mask)
    assert out.detach().numpy().reshape(-1).tolist() == [0, 0, 0, 2]
    out.backward(t([[[[0, 0], [0, 5.0]]]]))
    assert x.grad.numpy().reshape(-1).tolist() == [5, 5]


def _roi_reference(x, rois, ph, pw, scale):
    """Fast R-CNN's loop, float64 bins from float32 ratios."""
    out = np.zeros((len(rois), x.shape[1], ph, pw))
    H, W = x.shape[2:]
    for r, (b, *box) in enumerate(rois):
        x1, y1, x2, y2 = [int(math.copysign(math.floor(abs(np.float32(v) * np.float32(scale)) + 0.5), v))
                          for v in box]
        rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
        bh, bw = np.float32(rh) / np.float32(ph), np.float32(rw) / np.float32(pw)
        for i in range(ph):
            for j in range(pw):
                hs = min(max(int(np.floor(i * bh)) + y1, 0), H)
                he = min(max(int(np.ceil((i + 1) * bh)) + y1, 0), H)
                ws = min(max(int(np.floor(j * bw)) + x1, 0), W)
                we = min(max(int(np.ceil((j + 1) * bw)) + x1, 0), W)
                if he > hs and we > ws:
                    out[r, :, i, j] = x[int(b), :, hs:he, ws:we].max(axis=(1, 2))
    return out


def test_roi_pooling_matches_fast_rcnn_rounding():
    x = rng.normal(size=(2, 3, 7, 9))
    rois = np.array([[0, 0, 0, 15, 11], [1, 3.9, 2.1, 30, 20], [1, 10, 10, 10, 10],
                     [0, -5, -6, 7, 3], [1, 34, 26, 40, 30]])
    layer = make_layer('name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 3 pooled_w: 2 '
                       'spatial_scale: 0.25 }', [x.shape, rois.shape]).double()
    out = layer(t(x), t(rois)).detach().numpy()
    np.testing.assert_allclose(out, _roi_reference(x, rois, 3, 2, 0.25), rtol=1e-12)
    assert layer.top_shapes([x.shape, rois.shape]) == [(5, 3, 3, 2)]


def test_axpy_and_shuffle_channel():
    a, x, y = rng.normal(size=(2, 3, 1, 1)), rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    axpy = make_layer('name: "a" type: "Axpy"', [a.shape, x.shape, y.shape])
    np.testing.assert_allclose(axpy(t(a), t(x), t(y)).numpy(), a * x + y, rtol=1e-12)
    with pytest.raises(LayerError, match="bottoms 1 and 2"):
        make_layer('name: "a" type: "Axpy"', [(2, 3), (2, 3, 2, 2), (2, 3, 2, 1)])
    z = np.arange(6.0).reshape(1, 6, 1, 1)
    shuffle = make_layer('name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 2 }', [z.shape])
    assert shuffle(t(z)).numpy().reshape(-1).tolist() == [0, 3, 1, 4, 2, 5]


def test_depthwise_equals_grouped_convolution():
    x = rng.normal(size=(2, 4, 6, 5))
    body = ('convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    dw = make_layer(f'name: "d" type: "ConvolutionDepthwise" {body}', [x.shape]).double()
    assert [tuple(b.shape) for b in dw.blobs] == [(4, 1, 3, 3), (4,)]
    w, b = dw.blobs[0].detach().numpy(), dw.blobs[1].detach().numpy()
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 4, 3, 3))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expected[:, :, i, j] = (patch * w[None, :, 0]).sum(axis=(2, 3)) + b
    np.testing.assert_allclose(dw(t(x)).detach().numpy(), expected, rtol=1e-10)


def _interp_reference(x, oh, ow):
    ih, iw = x.shape[2:]
    out = np.zeros(x.shape[:2] + (oh, ow))
    rh = np.float32(ih - 1) / np.float32(oh - 1) if oh > 1 else np.float32(0)
    rw = np.float32(iw - 1) / np.float32(ow - 1) if ow > 1 else np.float32(0)
    for i in range(oh):
        hr = np.float32(rh * np.float32(i)); h = int(hr); hp = 1 if h < ih - 1 else 0; hl = float(hr - h)
        for j in range(ow):
            wr = np.float32(rw * np.float32(j)); w = int(wr); wp = 1 if w < iw - 1 else 0; wl = float(wr - w)
            out[:, :, i, j] = ((1 - hl) * ((1 - wl) * x[:, :, h, w] + wl * x[:, :, h, w + wp])
                               + hl * ((1 - wl) * x[:, :, h + hp, w] + wl * x[:, :, h + hp, w + wp]))
    return out


@pytest.mark.parametrize("body,shape,out_hw", [
    ("zoom_factor: 3", (1, 2, 4, 5), (10, 13)),
    ("shrink_factor: 2", (1, 2, 7, 6), (4, 3)),
    ("height: 9 width: 4", (2, 1, 5, 5), (9, 4)),
    ("zoom_factor: 2 shrink_factor: 2", (1, 1, 5, 7), (5, 7)),
])
def test_interp_sizes_and_align_corners_bilinear(body, shape, out_hw):
    x = rng.normal(size=shape)
    layer = make_layer(f'name: "i" type: "Interp" interp_param {{ {body} }}', [shape]).double()
    out = layer(t(x)).detach().numpy()
    assert out.shape[2:] == out_hw
    np.testing.assert_allclose(out, _interp_reference(x, *out_hw), rtol=1e-7, atol=1e-12)


def test_interp_negative_pad_crops_and_positive_pad_is_refused():
    x = rng.normal(size=(1, 1, 6, 6))
    layer = make_layer('name: "i" type: "Interp" interp_param { zoom_factor: 2 pad_beg: -1 '
                       'pad_end: -1 }', [x.shape]).double()
    np.testing.assert_allclose(layer(t(x)).detach().numpy(), _interp_reference(x[:, :, 1:5, 1:5], 7, 7),
                               rtol=1e-7, atol=1e-12)
    with pytest.raises(LayerError, match="only crops"):
        make_layer('name: "i" type: "Interp" interp_param { zoom_factor: 2 pad_end: 1 }', [x.shape])


def test_pooling_ceil_mode_false_floors_like_round_mode_floor():
    body = 'pooling_param { pool: MAX kernel_size: 3 stride: 2 %s }'
    ceil = make_layer(f'name: "p" type: "Pooling" {body % ""}', [(1, 1, 8, 8)])
    floor = make_layer(f'name: "p" type: "Pooling" {body % "ceil_mode: false"}', [(1, 1, 8, 8)])
    assert ceil.top_shapes([(1, 1, 8, 8)]) == [(1, 1, 4, 4)]
    assert floor.top_shapes([(1, 1, 8, 8)]) == [(1, 1, 3, 3)]
    x = torch.arange(64.0).view(1, 1, 8, 8)
    np.testing.assert_array_equal(floor(x).numpy()[0, 0], [[18, 20, 22], [34, 36, 38], [50, 52, 54]])
    with pytest.raises(LayerError, match="disagree"):
        make_layer(f'name: "p" type: "Pooling" {body % "ceil_mode: false round_mode: CEIL"}',
                   [(1, 1, 8, 8)])
