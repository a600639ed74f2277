"""ROIPooling's region-at-a-time pooling (engine/layers/roi_pooling.py) against Fast R-CNN's
window-by-window loop: regions of every size and position (inside the map, across its edges,
outside it), bin sizes whose float32 arithmetic differs from the integer one, tied maxima
(the first in row-major order wins, and takes the gradient), with and without autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat.engine.layers import roi_pooling
from layer_utils import make_layer
from test_forks import _roi_reference


def _first_max_gradient(x, rois, ph, pw, scale, dy):
    """The gradient Fast R-CNN's backward gives: each window's dy to its first maximum."""
    grad = np.zeros_like(x)
    height, width = x.shape[2:]
    for r, (b, *box) in enumerate(rois):
        x1, y1, x2, y2 = [int(np.copysign(np.floor(abs(np.float32(v) * np.float32(scale)) + 0.5),
                                          v)) for v in box]
        rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
        bh, bw = np.float32(rh) / np.float32(ph), np.float32(rw) / np.float32(pw)
        for i in range(ph):
            for j in range(pw):
                hs = min(max(int(np.floor(np.float32(i) * bh)) + y1, 0), height)
                he = min(max(int(np.ceil(np.float32(i + 1) * bh)) + y1, 0), height)
                ws = min(max(int(np.floor(np.float32(j) * bw)) + x1, 0), width)
                we = min(max(int(np.ceil(np.float32(j + 1) * bw)) + x1, 0), width)
                if he <= hs or we <= ws:
                    continue
                for c in range(x.shape[1]):
                    window = x[int(b), c, hs:he, ws:we]
                    y, k = np.unravel_index(int(np.argmax(window)), window.shape)
                    grad[int(b), c, hs + y, ws + k] += dy[r, c, i, j]
    return grad


def _regions(rng, count, height, width, stride):
    """Regions in image coordinates, some past the map's edges and some wholly outside."""
    corner = rng.uniform(-3 * stride, (width + 2) * stride, (count, 2))
    size = rng.uniform(0, 14 * stride, (count, 2))
    boxes = np.concatenate([corner, corner + size], axis=1)
    boxes[:, 1::2] *= height / width
    return np.concatenate([rng.integers(0, 2, (count, 1)), boxes], axis=1).astype(np.float32)


@pytest.mark.parametrize("windows", ["adaptive where they match", "one by one"])
@pytest.mark.parametrize("pooled", [(7, 7), (3, 2), (6, 5)])
def test_regions_pool_as_fast_rcnns_loop(pooled, windows, monkeypatch):
    if windows == "one by one":       # the path of windows float32 arithmetic moved
        monkeypatch.setattr(roi_pooling, "_adaptive_windows",
                            lambda lo, hi: np.zeros(len(lo), dtype=bool))
    rng = np.random.default_rng(sum(pooled))
    x = rng.integers(-3, 4, (2, 5, 19, 23)).astype(np.float32)      # many tied maxima
    rois = _regions(rng, 60, 19, 23, 16)
    ph, pw = pooled
    layer = make_layer(f'name: "r" type: "ROIPooling" roi_pooling_param {{ pooled_h: {ph} '
                       f'pooled_w: {pw} spatial_scale: 0.0625 }}', [x.shape, rois.shape])
    want = _roi_reference(x, rois, ph, pw, 0.0625)
    with torch.no_grad():
        got = layer(torch.from_numpy(x), torch.from_numpy(rois))
    np.testing.assert_array_equal(got.numpy(), want)
    xg = torch.from_numpy(x).requires_grad_()
    out = layer(xg, torch.from_numpy(rois))
    np.testing.assert_array_equal(out.detach().numpy(), want)
    dy = rng.normal(size=out.shape).astype(np.float32)
    out.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(xg.grad.numpy(),
                               _first_max_gradient(x, rois, ph, pw, 0.0625, dy), rtol=1e-5,
                               atol=1e-5)


def test_a_region_whose_float32_bins_differ_from_the_integer_ones_keeps_caffes():
    """57 rows in 7 bins: float32 ``57 / 7`` times 7 rounds up past 57, so Caffe's last bin
    ends one row later (clipped by the region's map) than adaptive pooling's would."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 2, 64, 12)).astype(np.float32)
    rois = np.array([[0, 0, 0, 11, 56], [0, 2, 3, 9, 59]], np.float32)
    layer = make_layer('name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 7 '
                       'pooled_w: 3 spatial_scale: 1 }', [x.shape, rois.shape])
    _, (rows, _) = layer._bins(rois, (64, 12), 1)
    assert not roi_pooling._adaptive_windows(*rows)[0]
    with torch.no_grad():
        got = layer(torch.from_numpy(x), torch.from_numpy(rois))
    np.testing.assert_array_equal(got.numpy(), _roi_reference(x, rois, 7, 3, 1.0))
