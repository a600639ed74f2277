"""Pooling: Caffe goldens, a loop-by-loop reference of Caffe's algorithm, gradients, shapes, errors."""
from __future__ import annotations

from pathlib import Path

import math
import warnings

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat.engine.layers.pooling  # noqa: F401  (registers the layer)
from caffe_compat.engine.layers import TEST, LayerError, layer_class
from caffe_compat.proto import caffe_pb2
from layer_utils import gradcheck_layer, make_layer

GOLDENS = Path(__file__).parent / "goldens" / "layers"
FLT_MAX = float(np.finfo(np.float32).max)


def golden(case: str):
    with open(f"{GOLDENS}/{case}/net.prototxt") as f:
        net = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    return net, np.load(f"{GOLDENS}/{case}/golden.npz")


@pytest.mark.parametrize("case", ["pool_max_ceil", "pool_max_pad_clip", "pool_ave_pad",
                                  "pool_global_ave", "pool_ave_global_stride_max_rect"])
def test_golden(case):
    # pool_ave_global_stride_max_rect feeds one input to two layers (a Split): the input's
    # diff is the sum of both layers' contributions.
    net, z = golden(case)
    x = torch.from_numpy(z["in/data"]).requires_grad_()
    total = 0
    for lp in net.layer[1:]:
        layer = layer_class(lp.type)(lp, [tuple(x.shape)], TEST)
        y = layer(x)
        want = z[f"blob/{lp.top[0]}"]
        assert layer.top_shapes([tuple(x.shape)]) == [want.shape]
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-4, atol=1e-5)
        total = total + (y * torch.from_numpy(z[f"top_diff/{lp.top[0]}"])).sum()
    total.backward()
    np.testing.assert_allclose(x.grad.numpy(), z["diff/data"], rtol=1e-3, atol=1e-5)


# -- a direct transcription of Caffe's CPU loops, as the ground truth for edge cases -------------
def caffe_out(size, k, p, s, ceil, any_pad):
    span = (size + 2 * p - k) / s
    out = int(math.ceil(span) if ceil else math.floor(span)) + 1
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def reference(x, top_diff, pool, k, s, p, ceil):
    """Forward (top, mask) and backward (bottom diff) of Caffe's CPU pooling, with loops."""
    N, C, H, W = x.shape
    any_pad = p[0] > 0 or p[1] > 0
    oh, ow = caffe_out(H, k[0], p[0], s[0], ceil, any_pad), caffe_out(W, k[1], p[1], s[1], ceil, any_pad)
    top = np.zeros((N, C, oh, ow))
    mask = np.full((N, C, oh, ow), -1.0)
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * s[0] - p[0], j * s[1] - p[1]
                    g = top_diff[n, c, i, j]
                    if pool == "MAX":
                        he, we = min(hs + k[0], H), min(ws + k[1], W)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, arg = -FLT_MAX, -1
                        for h in range(hs, he):
                            for w in range(ws, we):
                                if x[n, c, h, w] > best:
                                    best, arg = x[n, c, h, w], h * W + w
                        top[n, c, i, j], mask[n, c, i, j] = best, arg
                        if arg >= 0:
                            dx[n, c, arg // W, arg % W] += g
                    else:
                        he, we = min(hs + k[0], H + p[0]), min(ws + k[1], W + p[1])
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                        with warnings.catch_warnings(), np.errstate(all="ignore"):
                            top[n, c, i, j] = np.float64(x[n, c, hs:he, ws:we].sum()) / size
                        if he > hs and we > ws:
                            dx[n, c, hs:he, ws:we] += g / size
    return top, mask, dx


def pool_text(pool, k, s, p, ceil, tops=1):
    extra = "" if ceil else " round_mode: FLOOR"
    top = ' top: "y"' + (' top: "mask"' if tops == 2 else "")
    return (f'name: "pool" type: "Pooling" bottom: "x"{top} pooling_param {{ pool: {pool} '
            f'kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} stride_w: {s[1]} '
            f'pad_h: {p[0]} pad_w: {p[1]}{extra} }}')


# (kernel, stride, pad, ceil, H x W). Comments say which path / Caffe rule each one exercises.
CONFIGS = [
    ((3, 3), (2, 2), (0, 0), True, (7, 7)),    # ordinary ceil pooling (fused torch op)
    ((2, 2), (3, 3), (0, 0), True, (6, 6)),    # k < s, no pad: last window starts at H (empty)
    ((1, 1), (3, 3), (0, 0), True, (5, 5)),    # ... starts past H: AVE divisor is negative
    ((2, 2), (3, 3), (0, 0), True, (7, 6)),    # partial overhang in H, empty window in W
    ((3, 3), (2, 2), (2, 2), True, (6, 6)),    # pad > k/2: torch refuses, explicit padding
    ((3, 2), (2, 3), (1, 1), True, (9, 7)),    # rectangular, padded clip
    ((3, 1), (2, 2), (1, 0), True, (5, 4)),    # pad_h > 0 makes Caffe clip W too
    ((3, 3), (3, 3), (1, 1), False, (8, 8)),   # FLOOR
    ((2, 2), (3, 3), (0, 0), False, (7, 8)),   # FLOOR, k < s
    ((4, 4), (2, 2), (0, 0), True, (3, 3)),    # kernel larger than the input
    ((4, 3), (1, 2), (3, 2), True, (4, 5)),    # pad = k - 1
]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("k,s,p,ceil,hw", CONFIGS)
def test_matches_caffe_loops(pool, k, s, p, ceil, hw):
    g = torch.Generator().manual_seed(0)
    # Small integers make many ties, so the first-index rule for MAX is exercised.
    x = torch.randint(-3, 4, (2, 2, *hw), generator=g).float().requires_grad_()
    tops = 2 if pool == "MAX" else 1
    layer = make_layer(pool_text(pool, k, s, p, ceil, tops), [tuple(x.shape)])
    out = layer(x)
    y = out[0] if tops == 2 else out
    top_diff = torch.randn(y.shape, generator=g)
    ref_top, ref_mask, ref_dx = reference(x.detach().double().numpy(), top_diff.double().numpy(),
                                          pool, k, s, p, ceil)
    assert layer.top_shapes([tuple(x.shape)]) == [ref_top.shape] * tops
    np.testing.assert_allclose(y.detach().numpy(), ref_top, rtol=1e-6, atol=1e-6, equal_nan=True)
    if tops == 2:
        assert out[1].dtype == torch.float32 and not out[1].requires_grad
        np.testing.assert_array_equal(out[1].numpy(), ref_mask)
    # Caffe's backward (mask -1 windows send nothing); NaN outputs must not leak into dx.
    y.backward(top_diff)
    np.testing.assert_allclose(x.grad.numpy(), ref_dx, rtol=1e-5, atol=1e-6)


def test_empty_window_values():
    # H = 6, k = 2, s = 3, pad 0: Caffe's third window starts at row 6 (outside the image).
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    mx, mask = make_layer(pool_text("MAX", (2, 2), (3, 3), (0, 0), True, 2), [(1, 1, 6, 6)])(x)
    assert mx.shape == (1, 1, 3, 3)
    assert mx[0, 0, 2, 0].item() == -FLT_MAX and mask[0, 0, 2, 0].item() == -1
    assert mx[0, 0, 1, 1].item() == 28 and mask[0, 0, 1, 1].item() == 28
    ave = make_layer(pool_text("AVE", (2, 2), (3, 3), (0, 0), True), [(1, 1, 6, 6)])(x)
    assert torch.isnan(ave[0, 0, 2]).all()  # Caffe divides 0 by a pool size of 0
    assert ave[0, 0, 1, 1].item() == (21 + 22 + 27 + 28) / 4


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("k,s,p,ceil,hw", [CONFIGS[0], CONFIGS[3], CONFIGS[4], CONFIGS[5],
                                           CONFIGS[7], CONFIGS[10]])
def test_gradcheck(pool, k, s, p, ceil, hw):
    if hw == (7, 6):
        hw = (7, 7)  # no empty window: -FLT_MAX or NaN would swamp the finite differences
    x = torch.randn((1, 2, *hw), generator=torch.Generator().manual_seed(1))
    layer = make_layer(pool_text(pool, k, s, p, ceil, 2 if pool == "MAX" else 1), [tuple(x.shape)])
    gradcheck_layer(layer, [x])


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_global_pooling(pool):
    x = torch.randn(2, 3, 5, 7)
    layer = make_layer(f'name: "g" type: "Pooling" pooling_param {{ pool: {pool} global_pooling: true }}',
                       [tuple(x.shape)])
    want = x.amax((2, 3), keepdim=True) if pool == "MAX" else x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(layer(x), want)
    # The kernel follows the bottom's size at every call (Caffe's Reshape).
    assert layer.top_shapes([(4, 3, 2, 9)]) == [(4, 3, 1, 1)]
    small = x[:, :, :2, :3]
    want = small.amax((2, 3), keepdim=True) if pool == "MAX" else small.mean((2, 3), keepdim=True)
    torch.testing.assert_close(layer(small), want)


@pytest.mark.parametrize("params,hw,out", [
    ("kernel_size: 3 stride: 2", (14, 14), (7, 7)),              # ceil((14-3)/2)+1
    ("kernel_size: 3 stride: 2 round_mode: FLOOR", (14, 14), (6, 6)),
    ("kernel_size: 2 stride: 2 pad: 1", (7, 7), (4, 4)),         # 5 before the pad clip
    ("kernel_size: 2 stride: 3", (6, 6), (3, 3)),                # no clip without pad
    ("kernel_size: 2 stride: 3 pad_h: 1 pad_w: 0", (6, 6), (3, 2)),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1", (9, 7), (5, 3)),
    ("kernel_size: 3", (5, 6), (3, 4)),                          # stride defaults to 1
])
def test_output_shapes(params, hw, out):
    layer = make_layer(f'name: "p" type: "Pooling" pooling_param {{ {params} }}', [(2, 3, *hw)])
    assert layer.top_shapes([(2, 3, *hw)]) == [(2, 3, *out)]
    assert tuple(layer(torch.randn(2, 3, *hw)).shape) == (2, 3, *out)


def test_float64_and_no_blobs():
    layer = make_layer('name: "p" type: "Pooling" pooling_param { pool: AVE kernel_size: 3 pad: 2 }',
                       [(1, 1, 4, 4)])
    assert len(layer.blobs) == 0
    assert layer(torch.randn(1, 1, 4, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("params,shape,message", [
    ("pool: STOCHASTIC kernel_size: 2 pad: 1", (1, 1, 4, 4), "not STOCHASTIC"),
    ("kernel_size: 2 kernel_h: 2 kernel_w: 2", (1, 1, 4, 4), "either kernel_size or kernel_h and kernel_w"),
    ("kernel_h: 2", (1, 1, 4, 4), "kernel_size (or both kernel_h and kernel_w) is required"),
    ("stride: 2", (1, 1, 4, 4), "kernel_size (or both kernel_h and kernel_w) is required"),
    ("global_pooling: true kernel_size: 2", (1, 1, 4, 4), "remove kernel_size/kernel_h/kernel_w"),
    ("global_pooling: true pad: 1", (1, 1, 4, 4), "only pad 0 and stride 1"),
    ("global_pooling: true stride: 2", (1, 1, 4, 4), "only pad 0 and stride 1"),
    ("kernel_size: 3 pad: 3", (1, 1, 4, 4), "pad_h (3) must be smaller than kernel_h (3)"),
    ("kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2", (1, 1, 4, 4), "pad_w (2) must be smaller than kernel_w (2)"),
    ("kernel_size: 3 pad: 1 pad_h: 1 pad_w: 1", (1, 1, 4, 4), "either pad or pad_h and pad_w"),
    ("kernel_size: 3 pad_h: 1", (1, 1, 4, 4), "pad_h and pad_w must be given together"),
    ("kernel_size: 3 stride: 1 stride_h: 1 stride_w: 1", (1, 1, 4, 4), "either stride or stride_h"),
    ("kernel_size: 3 stride: 0", (1, 1, 4, 4), "stride must be positive"),
    ("kernel_size: 0", (1, 1, 4, 4), "kernel size must be positive"),
    ("kernel_size: 2", (1, 4, 4), "bottom must have 4 axes"),
    ("kernel_size: 6", (1, 1, 4, 4), "output size [-1, -1] is empty"),
])
def test_errors(params, shape, message):
    with pytest.raises(LayerError) as e:
        make_layer(f'name: "bad" type: "Pooling" pooling_param {{ {params} }}', [shape])
    assert "layer 'bad' (Pooling)" in str(e.value) and message in str(e.value)


def test_mask_top_only_for_max():
    with pytest.raises(LayerError, match="only MAX pooling has a second"):
        make_layer('name: "p" type: "Pooling" top: "a" top: "b" pooling_param { pool: AVE kernel_size: 2 }',
                   [(1, 1, 4, 4)])


def test_all_minus_inf_window_gives_minus_flt_max():
    # Caffe starts every MAX window at -FLT_MAX and only a strictly greater value replaces it.
    x = torch.full((1, 1, 4, 4), -math.inf, dtype=torch.float64)
    x[0, 0, 3, 3] = 2.0
    layer = make_layer(pool_text("MAX", (2, 2), (2, 2), (0, 0), True, 2), [(1, 1, 4, 4)])
    y, mask = layer(x)
    assert y[0, 0, 0, 0].item() == -FLT_MAX and mask[0, 0, 0, 0].item() == -1
    assert y[0, 0, 1, 1].item() == 2.0 and mask[0, 0, 1, 1].item() == 15


@pytest.mark.parametrize("k,s,p,ceil,hw", CONFIGS + [((3, 3), (2, 2), (0, 0), True, (24, 24))])
def test_max_in_bfloat16_matches_float32(k, s, p, ceil, hw):
    # Under --precision bf16 the pooled blob is bf16: -FLT_MAX does not exist there, and a
    # bf16 mask could not hold indices past 256 (24 x 24 has 576 positions).
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-3, 4, (2, 2, *hw), generator=g).float()   # exact in bf16
    layer = make_layer(pool_text("MAX", k, s, p, ceil, 2), [tuple(x.shape)])
    y32, mask32 = layer(x)
    y16, mask16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and mask16.dtype == torch.float32
    np.testing.assert_array_equal(mask16.numpy(), mask32.numpy())
    empty = mask32 == -1
    np.testing.assert_array_equal(y16.float()[~empty].numpy(), y32[~empty].numpy())
    assert (y16.float()[empty] == float(torch.finfo(torch.bfloat16).min)).all()


def test_spp_levels_by_hand():
    """SPP on 7×9, pyramid_height 3: levels of 1, 2×2 and 4×4 bins (kernel ceil(H/b), pad
    (kernel·b − H + 1)//2); pyramid_height 1 keeps the 4-D (N, C, 1, 1) top."""
    from layer_utils import make_layer
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    spp = make_layer('name: "s" type: "SPP" spp_param { pyramid_height: 3 pool: MAX }',
                     [(2, 3, 7, 9)])
    out = spp(x)
    assert tuple(out.shape) == (2, 3 * (1 + 4 + 16))
    torch.testing.assert_close(out[:, :3], x.amax(dim=(2, 3)))
    # level 1: kernel (4, 5), pad (1, 1): bin (0, 0) covers rows 0..2 and columns 0..3
    torch.testing.assert_close(out[:, 3:3 + 12].reshape(2, 3, 2, 2)[:, :, 0, 0],
                               x[:, :, 0:3, 0:4].amax(dim=(2, 3)))
    one = make_layer('name: "s" type: "SPP" spp_param { pyramid_height: 1 pool: AVE }',
                     [(2, 3, 7, 9)])
    torch.testing.assert_close(one(x), x.mean(dim=(2, 3), keepdim=True))
