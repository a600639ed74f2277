"""lmb-freiburg/flownet2's layers (Correlation, FlowWarp, ChannelNorm, Accum, Resample) against
OpenCV DNN (cv2.dnn.readNetFromCaffe reads the same prototxt), against float64 loop
transcriptions of the fork's kernels, and through float64 gradient checks."""
import math

import cv2
import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer


def inputs_text(shapes):
    return "".join(f'input: "{n}" input_shape {{ {" ".join(f"dim: {d}" for d in s)} }}\n'
                   for n, s in shapes.items())


def one_layer(tmp_path, kind, body, feeds):
    bottoms = "".join(f'bottom: "{n}" ' for n in feeds)
    text = (inputs_text({n: v.shape for n, v in feeds.items()})
            + f'layer {{ name: "out" type: "{kind}" {bottoms} top: "out" {body} }}\n')
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return str(path)


def run_ours(path, feeds, out="out"):
    net = caffe.Net(path, caffe.TEST)
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    net.forward()
    return net.blobs[out].data.copy()


def run_opencv(path, feeds, out="out", weights=None):
    net = cv2.dnn.readNetFromCaffe(path, weights) if weights else cv2.dnn.readNetFromCaffe(path)
    for name, value in feeds.items():
        net.setInput(value, name)
    return net.forward(out)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- float64 transcriptions of the fork's kernels (loops, as the CUDA/C++ code) -------------

def correlation_ref(a, b, pad, k, md, s1, s2, subtract=False):
    a = np.pad(a.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    b = np.pad(b.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, hp, wp = a.shape
    border = md + (k - 1) // 2
    th, tw = math.ceil((hp - 2 * border) / s1), math.ceil((wp - 2 * border) / s1)
    r = md // s2
    g = 2 * r + 1
    top = np.zeros((n, g * g, th, tw))
    for item in range(n):
        for y in range(th):
            for x in range(tw):
                x1, y1 = x * s1 + md, y * s1 + md
                for ch in range(g * g):
                    s2o, s2p = (ch % g - r) * s2, (ch // g - r) * s2
                    p0 = a[item, :, y1:y1 + k, x1:x1 + k]
                    p1 = b[item, :, y1 + s2p:y1 + s2p + k, x1 + s2o:x1 + s2o + k]
                    v = np.abs(p0 - p1) if subtract else p0 * p1
                    top[item, ch, y, x] = v.sum() / (k * k * c)
    return top


def correlation1d_ref(a, b, pad, k, md, s1, s2, direction):
    """The fork's 1-D kernel on its channel-last buffer, flattened as the GPU reads it: a
    read left of a row lands in the previous row (zeros here: pad covers it)."""
    n, c, h, w = a.shape
    a = np.pad(a.astype(np.float64), ((0, 0), (0, 0), (0, 0), (pad, pad)))
    b = np.pad(b.astype(np.float64), ((0, 0), (0, 0), (0, 0), (pad, pad)))
    flat_a, flat_b = a.transpose(0, 2, 3, 1).reshape(-1, c), b.transpose(0, 2, 3, 1).reshape(-1, c)
    wp, kr, r = w + 2 * pad, (k - 1) // 2, md // s2
    g = r + 1 if direction else 2 * r + 1
    shift = {0: -r, 1: 0, -1: -g}[direction]
    th, tw = math.ceil((h - 2 * kr) / s1), math.ceil((wp - 2 * (md + kr)) / s1)
    top = np.zeros((n, g, th, tw))
    for item, y, x, ch in np.ndindex(n, th, tw, g):
        x1, y1, s2o = x * s1 + md, y * s1, (ch + shift) * s2
        total = 0.0
        for j in range(k):
            for i in range(k):
                p0 = (item * h + y1 + j) * wp + x1 + i
                p1 = (item * h + y1 + j) * wp + x1 + s2o + i
                total += flat_a[p0] @ (flat_b[p1] if p1 >= 0 else np.zeros(c))
        top[item, ch, y, x] = total / (k * k * c)
    return top


@pytest.mark.parametrize("pad, k, md, s1, s2, direction",
                         [(3, 1, 3, 1, 1, 0), (2, 3, 2, 1, 1, 1), (4, 1, 3, 2, 1, -1),
                          (2, 3, 4, 1, 2, -1)])
def test_correlation1d_matches_the_kernel(tmp_path, pad, k, md, s1, s2, direction):
    rng = np.random.default_rng(md * 10 + pad)
    feeds = {"a": rand(rng, 2, 3, 6, 9), "b": rand(rng, 2, 3, 6, 9)}
    body = (f"correlation_param {{ pad: {pad} kernel_size: {k} max_displacement: {md} "
            f"stride_1: {s1} stride_2: {s2} single_direction: {direction} }}")
    ours = run_ours(one_layer(tmp_path, "Correlation1D", body, feeds), feeds)
    ref = correlation1d_ref(feeds["a"], feeds["b"], pad, k, md, s1, s2, direction)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_correlation1d_refuses_a_left_overshoot_past_the_padding():
    with pytest.raises(LayerError, match="pad must be at least 1"):
        make_layer('name: "c" type: "Correlation1D" correlation_param { kernel_size: 1 '
                   'max_displacement: 2 single_direction: -1 }', [(1, 1, 4, 8)] * 2)


def flow_warp_ref(image, flow, fill=0.0):
    n, c, h, w = image.shape
    out = np.empty((n, c, h, w))
    for i in range(n):
        for y in range(h):
            for x in range(w):
                x2 = np.float32(x) + flow[i, 0, y, x]
                y2 = np.float32(y) + flow[i, 1, y, x]
                if not (x2 >= 0 and y2 >= 0 and x2 < w and y2 < h):
                    out[i, :, y, x] = fill
                    continue
                xl, yt = int(x2), int(y2)
                xr, yb = min(xl + 1, w - 1), min(yt + 1, h - 1)
                al, be = float(x2) - xl, float(y2) - yt
                im = image[i].astype(np.float64)
                out[i, :, y, x] = ((1 - al) * (1 - be) * im[:, yt, xl] + al * (1 - be) * im[:, yt, xr]
                                   + (1 - al) * be * im[:, yb, xl] + al * be * im[:, yb, xr])
    return out


def accum_ref(bottoms, th, tw):
    parts = []
    for b in bottoms:
        n, c, h, w = b.shape
        out = np.empty((n, c, th, tw))
        for yy in range(th):
            for xx in range(tw):
                xp, yp = xx / (tw - 1) * (w - 1), yy / (th - 1) * (h - 1)
                x0, y0 = int(math.floor(xp)), int(math.floor(yp))
                x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
                dx, dy = xp - x0, yp - y0
                out[:, :, yy, xx] = ((1 - dx) * (1 - dy) * b[:, :, y0, x0] + dx * dy * b[:, :, y1, x1]
                                     + (1 - dx) * dy * b[:, :, y1, x0] + dx * (1 - dy) * b[:, :, y0, x1])
        parts.append(out)
    return np.concatenate(parts, axis=1)


def resample_ref(x, oh, ow, kind="LINEAR", antialias=True):
    """The fork's InterpolationKernel / NearestNeighborKernel, one output pixel at a time."""
    n, c, h, w = x.shape
    fx, fy = np.float32(w) / np.float32(ow), np.float32(h) / np.float32(oh)
    out = np.zeros((n, c, oh, ow))
    cubic = kind == "CUBIC"

    def coeff(t):
        t = abs(t)
        if cubic:
            return (t * t * (1.5 * t - 2.5) + 1 if t <= 1 else
                    t * (t * (-0.5 * t + 2.5) - 4) + 2 if t < 2 else 0.0)
        return 1 - t if t <= 1 else 0.0

    down = (fx > 1 or fy > 1) and antialias
    ax, ay = (1 / float(fx), 1 / float(fy)) if down else (1.0, 1.0)
    kw = 4 if cubic else 2
    rx = 2 if fx < 1 else math.ceil(kw / ax)
    ry = 2 if fy < 1 else math.ceil(kw / ay)
    for yo in range(oh):
        for xo in range(ow):
            xi = float(np.float32(xo) * fx + fy / np.float32(2) - np.float32(0.5))
            yi = float(np.float32(yo) * fy + fx / np.float32(2) - np.float32(0.5))
            xr, yr = int(math.floor(xi + 0.5)), int(math.floor(yi + 0.5))
            if kind == "NEAREST":     # clamped: the fork reads past the row/channel here
                out[:, :, yo, xo] = x[:, :, min(yr, h - 1), min(xr, w - 1)]
                continue
            s, ws = 0.0, 0.0
            for yy in range(max(yr - ry, 0), min(yr + ry, h - 1) + 1):
                for xx in range(max(xr - rx, 0), min(xr + rx, w - 1) + 1):
                    wgt = ax * coeff(ax * (xi - xx)) * ay * coeff(ay * (yi - yy))
                    s = s + wgt * x[:, :, yy, xx].astype(np.float64)
                    ws += wgt
            out[:, :, yo, xo] = s / ws if ws else 0.0
    return out


CORR = [(0, 1, 2, 1, 1), (2, 3, 2, 1, 2), (1, 1, 3, 2, 1), (4, 1, 4, 2, 2)]


@pytest.mark.parametrize("pad, k, md, s1, s2", CORR)
def test_correlation_matches_opencv_and_the_kernel(tmp_path, pad, k, md, s1, s2):
    rng = np.random.default_rng(pad * 7 + k)
    feeds = {"a": rand(rng, 2, 3, 9, 10), "b": rand(rng, 2, 3, 9, 10)}
    body = (f"correlation_param {{ pad: {pad} kernel_size: {k} max_displacement: {md} "
            f"stride_1: {s1} stride_2: {s2} }}")
    path = one_layer(tmp_path, "Correlation", body, feeds)
    ours = run_ours(path, feeds)
    ref = correlation_ref(feeds["a"], feeds["b"], pad, k, md, s1, s2)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, run_opencv(path, feeds), rtol=1e-4, atol=1e-5)


def test_correlation_subtract_matches_the_kernel(tmp_path):
    rng = np.random.default_rng(3)
    feeds = {"a": rand(rng, 1, 2, 8, 8), "b": rand(rng, 1, 2, 8, 8)}
    body = ("correlation_param { pad: 1 kernel_size: 3 max_displacement: 2 "
            "correlation_type: SUBTRACT }")
    ours = run_ours(one_layer(tmp_path, "Correlation", body, feeds), feeds)
    ref = correlation_ref(feeds["a"], feeds["b"], 1, 3, 2, 1, 1, subtract=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", ["ZERO", "NOT_A_NUMBER"])
def test_flow_warp_matches_opencv_and_the_cpu_code(tmp_path, fill):
    rng = np.random.default_rng(5)
    feeds = {"img": rand(rng, 2, 3, 7, 9), "flow": rand(rng, 2, 2, 7, 9) * 3}
    feeds["flow"][0, :, 0, 0] = [8.0, 6.0]        # lands exactly on the last column/row
    path = one_layer(tmp_path, "FlowWarp", f"flow_warp_param {{ fill_value: {fill} }}", feeds)
    ours = run_ours(path, feeds)
    ref = flow_warp_ref(feeds["img"], feeds["flow"], 0.0 if fill == "ZERO" else np.nan)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    if fill == "ZERO":   # OpenCV's FlowWarp writes only zeros outside
        np.testing.assert_allclose(ours, run_opencv(path, feeds), rtol=1e-5, atol=1e-5)


def test_channel_norm_is_the_l2_norm_over_channels(tmp_path):
    rng = np.random.default_rng(6)
    feeds = {"x": rand(rng, 2, 4, 3, 5)}
    ours = run_ours(one_layer(tmp_path, "ChannelNorm", "", feeds), feeds)
    ref = np.sqrt((feeds["x"].astype(np.float64) ** 2).sum(1, keepdims=True))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("body, size", [("", (6, 7)), ("accum_param { top_height: 8 top_width: 9 }",
                                                       (8, 9)),
                                        ("accum_param { size_divisible_by: 4 }", (8, 8))])
def test_accum_resizes_and_concatenates(tmp_path, body, size):
    rng = np.random.default_rng(7)
    feeds = {"a": rand(rng, 1, 2, 6, 5), "b": rand(rng, 1, 3, 3, 7)}
    path = one_layer(tmp_path, "Accum", body, feeds)
    ours = run_ours(path, feeds)
    np.testing.assert_allclose(ours, accum_ref(list(feeds.values()), *size), rtol=1e-5, atol=1e-6)
    if not body:
        np.testing.assert_allclose(ours, run_opencv(path, feeds), rtol=1e-5, atol=1e-5)


def test_accum_with_a_reference_takes_only_its_size(tmp_path):
    rng = np.random.default_rng(8)
    feeds = {"a": rand(rng, 1, 2, 3, 4), "ref": rand(rng, 1, 5, 7, 6)}
    ours = run_ours(one_layer(tmp_path, "Accum", "accum_param { have_reference: true }", feeds),
                    feeds)
    np.testing.assert_allclose(ours, accum_ref([feeds["a"]], 7, 6), rtol=1e-5, atol=1e-6)


RESAMPLE = [("LINEAR", 12, 14, True), ("LINEAR", 4, 5, True), ("LINEAR", 4, 5, False),
            ("CUBIC", 5, 12, True), ("CUBIC", 12, 4, True), ("NEAREST", 13, 6, True)]


@pytest.mark.parametrize("kind, oh, ow, antialias", RESAMPLE)
def test_resample_matches_the_gpu_kernel(tmp_path, kind, oh, ow, antialias):
    rng = np.random.default_rng(oh * ow)
    feeds = {"x": rand(rng, 2, 3, 8, 9)}
    body = (f"resample_param {{ type: {kind} height: {oh} width: {ow} "
            f"antialias: {str(antialias).lower()} }}")
    ours = run_ours(one_layer(tmp_path, "Resample", body, feeds), feeds)
    ref = resample_ref(feeds["x"], oh, ow, kind, antialias)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_resample_to_a_reference_blob(tmp_path):
    rng = np.random.default_rng(9)
    feeds = {"x": rand(rng, 1, 2, 4, 5), "ref": rand(rng, 1, 1, 9, 11)}
    ours = run_ours(one_layer(tmp_path, "Resample", "", feeds), feeds)
    np.testing.assert_allclose(ours, resample_ref(feeds["x"], 9, 11), rtol=1e-5, atol=1e-5)


GRADS = [("Correlation", "correlation_param { pad: 2 kernel_size: 3 max_displacement: 2 "
                         "stride_1: 2 stride_2: 2 }", [(2, 3, 6, 7), (2, 3, 6, 7)]),
         ("Correlation", "correlation_param { kernel_size: 1 max_displacement: 1 }",
          [(1, 2, 4, 5), (1, 2, 4, 5)]),
         ("ChannelNorm", "", [(2, 3, 4, 5)]),
         ("Accum", "accum_param { top_height: 7 top_width: 6 }", [(1, 2, 3, 4), (1, 1, 5, 5)])]


@pytest.mark.parametrize("kind, body, shapes", GRADS)
def test_gradients_in_float64(kind, body, shapes):
    g = torch.Generator().manual_seed(1)
    layer = make_layer(f'name: "l" type: "{kind}" {body}', shapes)
    gradcheck_layer(layer, [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes])


def test_flow_warp_gradient_in_float64():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    # flows away from integer positions and the image border (bilinear kinks)
    flow = (torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64) * 0.6 + 0.2)
    flow = flow + torch.randint(-1, 2, (2, 2, 5, 6), generator=g).double()
    layer = make_layer('name: "l" type: "FlowWarp"', [image.shape, flow.shape])
    gradcheck_layer(layer, [image, flow])


def test_channel_norm_gradient_is_finite_at_zero():
    x = torch.zeros(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    make_layer('name: "l" type: "ChannelNorm"', [x.shape]).double()(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("text, shapes, words", [
    ("correlation_param { kernel_size: 2 max_displacement: 1 }", [(1, 1, 5, 5)] * 2, "odd"),
    ("correlation_param { kernel_size: 1 }", [(1, 1, 5, 5)] * 2, "max_displacement"),
    ("correlation_param { kernel_size: 3 max_displacement: 4 }", [(1, 1, 5, 5)] * 2, "too small"),
    ("correlation_param { kernel_size: 1 max_displacement: 1 }", [(1, 1, 5, 5), (1, 2, 5, 5)],
     "same shape")])
def test_correlation_errors_name_the_layer(text, shapes, words):
    with pytest.raises(LayerError, match=words) as err:
        make_layer(f'name: "corr" type: "Correlation" {text}', shapes)
    assert "corr" in str(err.value)


def test_resample_area_and_bad_flow_are_refused():
    with pytest.raises(LayerError, match="AREA"):
        make_layer('name: "r" type: "Resample" resample_param { type: AREA width: 2 height: 2 }',
                   [(1, 1, 4, 4)])
    with pytest.raises(LayerError, match="flow must be"):
        make_layer('name: "w" type: "FlowWarp"', [(1, 3, 4, 4), (1, 3, 4, 4)])


def layer(name, kind, bottoms, top, body=""):
    bottoms = " ".join(f'bottom: "{b}"' for b in bottoms)
    return f'layer {{ name: "{name}" type: "{kind}" {bottoms} top: "{top}" {body} }}\n'


FILLERS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 }'


def tiny_flownet(opencv=False):
    """Two images -> shared-shape convs -> Correlation -> conv -> Deconvolution (flow) ->
    FlowWarp of image 2 by the flow, ChannelNorm of the error, Accum, Resample. OpenCV 4.14
    creates no ChannelNorm or Resample layer: ``opencv`` leaves those two out."""
    def conv(outputs, stride):
        return (f"convolution_param {{ num_output: {outputs} kernel_size: 3 pad: 1 "
                f"stride: {stride} {FILLERS} }}")

    return (inputs_text({"img0": (1, 3, 16, 20), "img1": (1, 3, 16, 20)})
            + layer("conv_a", "Convolution", ["img0"], "fa", conv(4, 2))
            + layer("conv_b", "Convolution", ["img1"], "fb", conv(4, 2))
            + layer("corr", "Correlation", ["fa", "fb"], "corr",
                    "correlation_param { pad: 2 kernel_size: 1 max_displacement: 2 stride_2: 1 }")
            + layer("relu", "ReLU", ["corr"], "corr_r", "relu_param { negative_slope: 0.1 }")
            + layer("conv_c", "Convolution", ["corr_r"], "fc", conv(2, 1))
            + layer("up", "Deconvolution", ["fc"], "flow",
                    "convolution_param { num_output: 2 kernel_size: 4 stride: 2 pad: 1 "
                    + FILLERS + " }")
            + layer("warp", "FlowWarp", ["img1", "flow"], "warped")
            + layer("diff", "Eltwise", ["img0", "warped"], "err",
                    "eltwise_param { operation: SUM coeff: 1 coeff: -1 }")
            + layer("accum", "Accum", ["flow", "fc"], "stack")
            + ("" if opencv else
               layer("norm", "ChannelNorm", ["err"], "err_norm")
               + layer("small", "Resample", ["stack"], "out",
                       "resample_param { type: LINEAR width: 10 height: 8 }")))


def test_tiny_flownet_builds_runs_and_matches_opencv(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(tiny_flownet())
    torch.manual_seed(0)              # the fillers' draws
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.default_rng(11)
    feeds = {"img0": rand(rng, 1, 3, 16, 20), "img1": rand(rng, 1, 3, 16, 20)}
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    net.forward()
    assert net.blobs["corr"].data.shape == (1, 25, 8, 10)
    assert net.blobs["out"].data.shape == (1, 4, 8, 10)
    weights = str(tmp_path / "tiny.caffemodel")
    net.save(weights)
    cv_path = tmp_path / "tiny_opencv.prototxt"
    cv_path.write_text(tiny_flownet(opencv=True))
    ocv = cv2.dnn.readNetFromCaffe(str(cv_path), weights)
    for name, value in feeds.items():
        ocv.setInput(value, name)
    names = ["corr", "up", "warp", "accum"]
    got = dict(zip(names, ocv.forward(names)))
    np.testing.assert_allclose(net.blobs["corr"].data, got["corr"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.blobs["flow"].data, got["up"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.blobs["warped"].data, got["warp"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.blobs["stack"].data, got["accum"], rtol=1e-4, atol=1e-4)
    # the tail against this file's float64 references, from the net's own blobs
    flow, img1 = net.blobs["flow"].data, feeds["img1"]
    np.testing.assert_allclose(net.blobs["warped"].data, flow_warp_ref(img1, flow), atol=1e-5)
    ref_stack = accum_ref([flow, net.blobs["fc"].data], 16, 20)
    np.testing.assert_allclose(net.blobs["out"].data, resample_ref(ref_stack.astype(np.float32),
                                                                   8, 10), rtol=1e-4, atol=1e-5)
    err = (feeds["img0"].astype(np.float64) - net.blobs["warped"].data)
    np.testing.assert_allclose(net.blobs["err_norm"].data,
                               np.sqrt((err ** 2).sum(1, keepdims=True)), rtol=1e-5, atol=1e-5)


def test_resample_nearest_matches_opencv_and_linear_upsampling_is_half_pixel(tmp_path):
    """OpenCV reads Resample as its Resize: NEAREST agrees; its LINEAR maps pixels another
    way, so the fork's LINEAR 2x upsampling is checked against torch's half-pixel bilinear
    (the triangle filter's normalised window gives the same border values)."""
    rng = np.random.default_rng(15)
    feeds = {"x": rand(rng, 1, 2, 8, 9)}
    near = one_layer(tmp_path, "Resample", "resample_param { type: NEAREST height: 16 width: 18 }",
                     feeds)
    np.testing.assert_array_equal(run_ours(near, feeds), run_opencv(near, feeds))
    lin_dir = tmp_path / "linear"
    lin_dir.mkdir()
    linear = one_layer(lin_dir, "Resample", "resample_param { height: 16 width: 18 }", feeds)
    half_pixel = torch.nn.functional.interpolate(torch.from_numpy(feeds["x"]), size=(16, 18),
                                                 mode="bilinear", align_corners=False)
    np.testing.assert_allclose(run_ours(linear, feeds), half_pixel.numpy(), atol=1e-6)
