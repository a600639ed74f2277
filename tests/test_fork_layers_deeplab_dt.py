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


def forward_net(tmp_path, text, seed, **inputs):
    """A TRAIN net from ``text`` with normal random "data" and the given inputs, run forward."""
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    net = caffe.Net(str(path), caffe.TRAIN)
    data = net.blobs["data"].data
    data[...] = np.random.default_rng(seed).normal(size=data.shape)
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.forward()
    return net


def test_net_trains_through_the_layer(tmp_path):
    net = forward_net(tmp_path, NET, 7, dims=np.array([[4, 5], [3, 4]]).reshape(2, 2, 1, 1))
    score = net.blobs["score"].data.astype(np.float64)
    edge = net.blobs["edge"].data.astype(np.float64)
    want, _, _ = reference(score, edge, [[4, 5], [3, 4]], 2, 3.0, 2.0)
    np.testing.assert_allclose(net.blobs["filtered"].data, want, rtol=1e-4, atol=1e-5)
    net.backward()
    dtop = (want - score) / 2                           # EuclideanLoss' diff for "filtered"
    _, _, want_dedge = reference(score, edge, [[4, 5], [3, 4]], 2, 3.0, 2.0, dtop=dtop)
    np.testing.assert_allclose(net.blobs["edge"].diff, want_dedge, rtol=1e-3, atol=1e-5)
    assert np.abs(net.params["edge"][0].diff).sum() > 0


# ---------------------------------------------------------------- AdaptiveBiasChannel
ABC = 'name: "abc" type: "AdaptiveBiasChannel" adaptive_bias_channel_param { %s }'


def abc_reference(score, labels, num_iter=1, bg=0.25, fg=0.25, suppress=True, margin=0.0):
    """The fork's per-image loops in float64; the foreground order drawn as the layer draws
    it (torch.randperm on the global generator, seeded alike by the caller)."""
    out = np.array(score, np.float64)
    n_, c, h, w = out.shape
    for n in range(n_):
        found = sorted(int(v) for v in np.ravel(labels[n]) if int(v) != -1)
        if not found:
            continue
        top = out[n].reshape(c, h * w)
        if suppress:
            low = np.full(h * w, np.inf)
            for ch in set(found):
                low = np.minimum(low, top[ch])
            for ch in range(c):
                if ch not in found:
                    for i in range(h * w):
                        if top[ch, i] > low[i]:
                            top[ch, i] = low[i] - margin
        high = top[found[0]].copy()
        for ch in found[1:]:
            high = np.maximum(high, top[ch])
        before = high.mean()
        start = 1 if 0 in found else 0
        for _ in range(num_iter):
            rest = found[start:]
            found[start:] = [rest[j] for j in torch.randperm(len(rest)).tolist()]
            for ch in found:
                nth = int(np.float32(bg if ch == 0 else fg) * np.float32(h * w))
                top[ch] += np.sort(high - top[ch])[nth]
                high = np.maximum(high, top[ch])
        top += before - high.mean()
    return out


def run_abc(text, score, labels, seed=0):
    score, labels = torch.tensor(score), torch.tensor(labels, dtype=torch.float64)
    layer = make_layer(ABC % text, [score.shape, labels.shape])
    torch.manual_seed(seed)
    return layer(score, labels).numpy()


def test_abc_one_row_in_closed_form():
    # labels {0, 1} of 3; bg_portion 0.5 on 4 positions: the 3rd smallest gap (index 2)
    score = np.array([[[[0., 2, 1, 5]], [[1., 0, 3, 4]], [[9., 9, 0, 0]]]])
    out = run_abc("bg_portion: 0.5 fg_portion: 0.25 margin_others: 0.5", score,
                  [[[[0.]], [[1.]], [[-1.]]]])
    low = np.array([0., 0, 1, 4])                        # min of channels 0, 1
    third = np.where(score[0, 2, 0] > low, low - 0.5, score[0, 2, 0])
    high = np.array([1., 2, 3, 5])
    gap0 = np.sort(high - score[0, 0, 0])[2]             # 1 -> channel 0 + 1
    ch0 = score[0, 0, 0] + gap0
    high = np.maximum(high, ch0)
    ch1 = score[0, 1, 0] + np.sort(high - score[0, 1, 0])[1]
    high = np.maximum(high, ch1)
    shift = np.array([1., 2, 3, 5]).mean() - high.mean()
    np.testing.assert_allclose(out[0, :, 0], np.stack([ch0, ch1, third]) + shift, rtol=1e-12)


@pytest.mark.parametrize("text,kw", [
    ("num_iter: 2 bg_portion: 0.25 fg_portion: 0.5", dict(num_iter=2, bg=0.25, fg=0.5)),
    ("suppress_others: false fg_portion: 0.75", dict(suppress=False, fg=0.75)),
])
def test_abc_matches_the_forks_loops(text, kw):
    rng = np.random.default_rng(11)
    score = rng.normal(size=(3, 5, 2, 4))
    labels = np.array([[0, 2, 4, -1], [3, 1, -1, -1], [-1, -1, -1, -1.]]).reshape(3, 4, 1, 1)
    margin = 0.0 if "suppress_others: false" in text else float(np.float32(1e-5))
    out = run_abc(text, score, labels, seed=4)
    torch.manual_seed(4)
    want = abc_reference(score, labels, margin=margin, **kw)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[2], score[2])     # no labels: unchanged


@pytest.mark.parametrize("text,shapes,message", [
    ("num_iter: 0", None, r"num_iter \(0\) must be positive"),
    ("bg_portion: 1", None, r"bg_portion \(1\) must be in \[0, 1\)"),
    ("fg_portion: -0.5", None, r"fg_portion \(-0.5\) must be in \[0, 1\)"),
    ("margin_others: -1", None, r"margin_others \(-1\) must not be negative"),
    ("", [(1, 1, 2, 2), (1, 2, 1, 1)], "need at least 2 channels"),
    ("", [(1, 3, 2, 2), (1, 2, 2, 1)], r"must be \[1, L >= 1, 1, 1\]"),
])
def test_abc_bad_params_and_shapes(text, shapes, message):
    with pytest.raises(LayerError, match=r"layer 'abc' \(AdaptiveBiasChannel\): .*" + message):
        make_layer(ABC % text, shapes or [(1, 3, 2, 2), (1, 2, 1, 1)])


def test_abc_label_outside_the_channels():
    with pytest.raises(LayerError, match=r"image 0: unexpected label 3; labels must be in "
                       r"\[0, 3\) or -1"):
        run_abc("", np.zeros((1, 3, 2, 2)), [[[[0.]], [[3.]]]])


ABC_NET = """
name: "em_adapt"
input: "data" input_dim: 2 input_dim: 2 input_dim: 3 input_dim: 4
input: "label" input_dim: 2 input_dim: 1 input_dim: 3 input_dim: 4
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "unique" type: "UniqueLabel" bottom: "label" top: "unique"
  unique_label_param { max_labels: 3 ignore_label: 255 force_label: 0 } }
layer { name: "adapt" type: "AdaptiveBiasChannel" bottom: "score" bottom: "unique"
  top: "adapted" adaptive_bias_channel_param { bg_portion: 0.25 fg_portion: 0.25 } }
layer { name: "pseudo" type: "ArgMax" bottom: "adapted" top: "pseudo" argmax_param { axis: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "pseudo" top: "loss" }
"""


def test_abc_net_makes_pseudo_labels_and_trains_the_scores(tmp_path):
    label = np.array([2] * 6 + [255] * 6 + [3] * 12).reshape(2, 1, 3, 4)
    net = forward_net(tmp_path, ABC_NET, 2, label=label)
    score = net.blobs["score"].data.astype(np.float64)
    want = abc_reference(score, [[0, 2, -1], [0, 3, -1]], margin=float(np.float32(1e-5)))
    np.testing.assert_allclose(net.blobs["adapted"].data, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(net.blobs["pseudo"].data[:, 0], want.argmax(1))
    net.backward()
    assert np.abs(net.params["score"][0].diff).sum() > 0   # through the loss, not the layer
