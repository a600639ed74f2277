"""DeepLab v2's DomainTransform (deeplab-public-ver2 ``domain_transform_layer.cpp``) against a
float64 per-position re-statement of the fork's CPU forward and backward, finite differences,
closed forms, its errors, and a small net that trains through it (docs/forks.md)."""
import math

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer

DT = 'name: "dt" type: "DomainTransform" domain_transform_param { %s }'


def _sigma(k, num_iter, spatial):
    return spatial * math.sqrt(3) * 2.0 ** (num_iter - k - 1) / math.sqrt(4.0 ** num_iter - 1)


def _scan(size_h, size_w, p):
    """The fork's visiting order for pass p: (row, col, neighbour row, neighbour col), the
    weight being read at the later of the two along the pass axis."""
    if p == 0:
        return [(h, w, h, w - 1) for h in range(size_h) for w in range(1, size_w)]
    if p == 1:
        return [(h, w, h, w + 1) for h in range(size_h) for w in range(size_w - 2, -1, -1)]
    if p == 2:
        return [(h, w, h - 1, w) for w in range(size_w) for h in range(1, size_h)]
    return [(h, w, h + 1, w) for w in range(size_w) for h in range(size_h - 2, -1, -1)]


def reference(x, ref, dims, num_iter=3, spatial=50.0, rng_sigma=5.0, min_weight=0.0, dtop=None):
    """(top, bottom-0 diff, bottom-1 diff), position by position as the fork's CPU code."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    dtop = np.ones_like(x) if dtop is None else np.asarray(dtop, np.float64)
    top, dx, dref = x.copy(), dtop.copy(), np.zeros_like(ref)
    for n in range(x.shape[0]):
        ih, iw = int(dims[n][0]), int(dims[n][1])
        weights, saved = [], {}
        for k in range(num_iter):
            mult = -math.sqrt(2) / _sigma(k, num_iter, spatial)
            wk = np.zeros(x.shape[2:])
            for h in range(ih):
                for w in range(iw):
                    value = math.exp(mult * (1 + ref[n, 0, h, w] * spatial / rng_sigma))
                    wk[h, w] = min(max(value, min_weight), 1.0)
            weights.append(wk)
            for c in range(x.shape[1]):
                y = top[n, c]
                for p in range(4):
                    saved[k, c, p] = inter = np.zeros(x.shape[2:])
                    for h, w, hp, wp in _scan(ih, iw, p):
                        inter[h, w] = y[hp, wp] - y[h, w]
                        y[h, w] += wk[max(h, hp), max(w, wp)] * inter[h, w]
        for k in reversed(range(num_iter)):
            wk, wdiff = weights[k], np.zeros(x.shape[2:])
            for c in range(x.shape[1]):
                g = dx[n, c]
                for p in reversed(range(4)):
                    for h, w, hp, wp in reversed(_scan(ih, iw, p)):
                        e = (max(h, hp), max(w, wp))
                        wdiff[e] += g[h, w] * saved[k, c, p][h, w]
                        g[hp, wp] += wk[e] * g[h, w]
                        g[h, w] *= 1 - wk[e]
            mult = -math.sqrt(2) / _sigma(k, num_iter, spatial)
            dref[n, 0] += mult * spatial / rng_sigma * wdiff * wk
    return top, dx, dref


def run(text, x, ref, dims, dtop):
    x = torch.tensor(x, requires_grad=True)
    ref = torch.tensor(ref, requires_grad=True)
    dims = torch.tensor(dims, dtype=torch.float64).view(x.shape[0], -1, 1, 1)
    layer = make_layer(DT % text, [x.shape, ref.shape, dims.shape])
    top = layer(x, ref, dims)
    top.backward(torch.tensor(dtop))
    return top.detach().numpy(), x.grad.numpy(), ref.grad.numpy()


@pytest.mark.parametrize("params,kw", [
    ("num_iter: 2 spatial_sigma: 3 range_sigma: 1", dict(num_iter=2, spatial=3, rng_sigma=1)),
    # min_weight clamps some weights: the fork's edge-map gradient still flows there
    ("num_iter: 3 spatial_sigma: 4 range_sigma: 0.5 min_weight: 0.25",
     dict(num_iter=3, spatial=4, rng_sigma=0.5, min_weight=0.25)),
])
def test_forward_and_backward_match_the_forks_loops(params, kw):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4, 5))
    ref = rng.uniform(-0.3, 1, size=(2, 1, 4, 5))       # some weights clamped to 1 as well
    dtop = rng.normal(size=x.shape)
    dims = [[4, 5], [3.7, 2.2]]                          # image 1: only its top-left 3x2
    top, dx, dref = run(params, x, ref, dims, dtop)
    want_top, want_dx, want_dref = reference(x, ref, dims, dtop=dtop, **kw)
    np.testing.assert_allclose(top, want_top, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dref, want_dref, rtol=1e-10, atol=1e-12)
    # outside the input size: copied, the diff passed through, no edge-map diff
    np.testing.assert_array_equal(top[1, :, 3:], x[1, :, 3:])
    np.testing.assert_array_equal(dx[1, :, :, 2:], dtop[1, :, :, 2:])
    assert not dref[1, :, 3:].any() and not dref[1, :, :, 2:].any()


def test_two_pixels_in_closed_form():
    """One row of two: left->right then right->left, the vertical passes do nothing."""
    spatial, rng_sigma, r = 2.0, 1.0, 0.25
    w = math.exp(-math.sqrt(2) / spatial * (1 + r * spatial / rng_sigma))   # one iteration
    x = np.array([1.0, 3.0]).reshape(1, 1, 1, 2)
    top, _, _ = run("num_iter: 1 spatial_sigma: 2 range_sigma: 1", x,
                    np.full((1, 1, 1, 2), r), [[1, 2]], np.zeros_like(x))
    right = 3 + w * (1 - 3)
    assert top.ravel() == pytest.approx([1 + w * (right - 1), right], rel=1e-12)


def test_constant_input_is_a_fixed_point_and_strong_edges_stop_smoothing():
    x = np.full((1, 2, 3, 3), 2.5)
    top, _, _ = run("", x, np.random.default_rng(0).uniform(size=(1, 1, 3, 3)), [[3, 3]],
                    np.zeros_like(x))
    np.testing.assert_allclose(top, x, rtol=1e-14)
    x = np.random.default_rng(1).normal(size=(1, 2, 3, 3))
    top, _, _ = run("", x, np.full((1, 1, 3, 3), 1e6), [[3, 3]], np.zeros_like(x))
    np.testing.assert_allclose(top, x, rtol=1e-14)       # weights exp(-huge) = 0


def test_finite_differences():
    rng = np.random.default_rng(5)
    layer = make_layer(DT % "num_iter: 2 spatial_sigma: 3 range_sigma: 2",
                       [(2, 2, 3, 4), (2, 1, 3, 4), (2, 2, 1, 1)])
    gradcheck_layer(layer, [torch.tensor(rng.normal(size=(2, 2, 3, 4))),
                            torch.tensor(rng.uniform(0, 1, size=(2, 1, 3, 4))),
                            torch.tensor([[3, 4], [2, 3.]]).view(2, 2, 1, 1)])


@pytest.mark.parametrize("params,shapes,message", [
    ("spatial_sigma: 0", None, r"spatial_sigma \(0\) and range_sigma \(5\) must be positive"),
    ("range_sigma: -1", None, "must be positive"),
    ("min_weight: -0.1", None, r"min_weight \(-0.1\) must not be negative"),
    ("num_iter: 0", None, r"num_iter \(0\) must be positive"),
    ("", [(2, 3, 4, 5), (2, 2, 4, 5), (2, 2)], r"edge map \[2, 2, 4, 5\] must be \[2, 1, 4, 5\]"),
    ("", [(2, 3, 4, 5), (2, 1, 4, 5), (2, 1)], r"size blob \[2, 1\] must hold"),
])
def test_bad_params_and_shapes(params, shapes, message):
    shapes = shapes or [(2, 3, 4, 5), (2, 1, 4, 5), (2, 2)]
    with pytest.raises(LayerError, match=r"layer 'dt' \(DomainTransform\): .*" + message):
        make_layer(DT % params, shapes)


def test_input_size_larger_than_the_blob():
    layer = make_layer(DT % "", [(1, 1, 2, 2), (1, 1, 2, 2), (1, 2)])
    with pytest.raises(LayerError, match=r"image 0: input size 3x2 is outside the 2x2 blob"):
        layer(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([[3., 2.]]))


NET = """
name: "dt_net"
input: "data" input_dim: 2 input_dim: 2 input_dim: 4 input_dim: 5
input: "dims" input_dim: 2 input_dim: 2 input_dim: 1 input_dim: 1
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "edge" type: "Convolution" bottom: "data" top: "edge"
  convolution_param { num_output: 1 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "dt" type: "DomainTransform" bottom: "score" bottom: "edge" bottom: "dims"
  top: "filtered" domain_transform_param { num_iter: 2 spatial_sigma: 3 range_sigma: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "filtered" bottom: "score" top: "loss" }
"""


def test_net_trains_through_the_layer(tmp_path):
    path = tmp_path / "dt.prototxt"
    path.write_text(NET)
    net = caffe.Net(str(path), caffe.TRAIN)
    rng = np.random.default_rng(7)
    net.blobs["data"].data[...] = rng.normal(size=(2, 2, 4, 5))
    net.blobs["dims"].data[...] = np.array([[4, 5], [3, 4]]).reshape(2, 2, 1, 1)
    net.forward()
    score = net.blobs["score"].data.astype(np.float64)
    edge = net.blobs["edge"].data.astype(np.float64)
    want, _, _ = reference(score, edge, [[4, 5], [3, 4]], 2, 3.0, 2.0)
    np.testing.assert_allclose(net.blobs["filtered"].data, want, rtol=1e-4, atol=1e-5)
    net.backward()
    dtop = (want - score) / 2                           # EuclideanLoss' diff for "filtered"
    _, _, want_dedge = reference(score, edge, [[4, 5], [3, 4]], 2, 3.0, 2.0, dtop=dtop)
    np.testing.assert_allclose(net.blobs["edge"].diff, want_dedge, rtol=1e-3, atol=1e-5)
    assert np.abs(net.params["edge"][0].diff).sum() > 0
