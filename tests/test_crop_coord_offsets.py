"""A Crop without crop_param: BVLC's offset 0, and one warning naming the offsets the FCN
"future" fork's parameterless Crop (s9xie/hed's src/caffe/layers/crop_layer.cpp) derived
from the coordinate maps, with the crop_param that reproduces them.

The nets are small HED-like chains (HED's deploy.prototxt pads conv1_1 by 35, pools, upsamples
with Deconvolution and crops against `data`); offsets are checked by hand and against pycaffe's
coord_map.crop on the same NetSpec, and the suggested crop_param is run."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import layers as L, params as P
from caffe_compat.coord_map import crop

H = W = 20


def hed_like(pad=35, crop_param=None, between=None):
    """data -> conv (k3, ``pad``) -> in-place ReLU -> max pool k2 s2 -> deconv k4 s2 -> Crop
    against data (which therefore gets a Split). ``between`` adds a layer after the conv."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, H, W]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=3, pad=pad)
    n.relu = L.ReLU(n.conv, in_place=True)
    last = n.relu
    if between is not None:
        n.between = between(last)
        last = n.between
    n.pool = L.Pooling(last, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.up = L.Deconvolution(n.pool, convolution_param=dict(num_output=1, kernel_size=4,
                                                          stride=2))
    kwargs = {} if crop_param is None else dict(crop_param=crop_param)
    n.out = L.Crop(n.up, n.data, **kwargs)
    return n


def build(tmp_path, spec, records):
    """Write ``spec`` (a NetSpec or prototxt text) to a file, build it for TEST and return
    (net, path, the warnings its build logged)."""
    path = tmp_path / "net.prototxt"
    path.write_text(spec if isinstance(spec, str) else str(spec.to_proto()))
    del records[:]
    net = caffe.Net(str(path), caffe.TEST)
    return net, path, [r.getMessage() for r in records if r.levelno == logging.WARNING]


@pytest.fixture
def records():
    """Records of the builder's logger (glog's ``caffe_compat`` logger does not propagate)."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = got.append
    logger = logging.getLogger("caffe_compat.engine.net.fork_crop")
    logger.addHandler(handler)
    yield got
    logger.removeHandler(handler)


def suggested(message):
    """(axis, offsets) of the crop_param line a warning suggests."""
    match = re.search(r"crop_param \{ axis: (\d+) ((?:offset: \d+ )+)\}", message)
    assert match, message
    return int(match.group(1)), [int(o) for o in re.findall(r"\d+", match.group(2))]


def hand_offset(pad):
    """data -> conv: x + pad - 1; pool k2 s2: (u - 1/2) / 2; deconv k4 s2: 2v + 3/2.
    So data x sits at up's x + pad + 1/2 - 1 + 3/2 - 1/2 = x + pad; the fork crops by that."""
    conv = lambda x: x + pad - (3 - 1) / 2           # noqa: E731
    pool = lambda u: (u - (2 - 1) / 2) / 2            # noqa: E731
    deconv = lambda v: 2 * v + (4 - 1) / 2            # noqa: E731
    shift = deconv(pool(conv(0.0)))
    assert deconv(pool(conv(7.0))) - shift == 7.0     # scale 1: a crop can align them
    return shift


def test_hed_like_crop_warns_once_with_the_forks_offsets(tmp_path, records):
    assert hand_offset(35) == 35.0
    n = hed_like(pad=35)
    reference = crop(n.up, n.data).fn.params["crop_param"]   # pycaffe's coord_map
    net, path, warnings = build(tmp_path, n, records)
    assert len(warnings) == 1
    message = warnings[0]
    assert str(path) in message and "layer 'out'" in message and "offsets 35, 35" in message
    assert "crop_param { axis: 2 offset: 35 }" in message    # one offset: both are equal
    assert suggested(message) == (reference["axis"], [int(o) for o in reference["offset"]])
    # BVLC's semantics kept: the top-left corner of the upsampled map.
    np.testing.assert_array_equal(net.blobs["out"].data, net.blobs["up"].data[:, :, :H, :W])
    caffe.Net(str(path), caffe.TRAIN)          # the same file again (a solver's other net)
    assert len(warnings) == 1


def test_unequal_offsets_are_listed_per_axis(tmp_path, records):
    assert hand_offset(33) == 33.0
    n = hed_like(pad=[35, 33])
    reference = crop(n.up, n.data).fn.params["crop_param"]
    _, _, warnings = build(tmp_path, n, records)
    assert len(warnings) == 1
    assert "crop_param { axis: 2 offset: 35 offset: 33 }" in warnings[0]
    assert suggested(warnings[0]) == (2, [int(o) for o in reference["offset"]]) == (2, [35, 33])


@pytest.mark.parametrize("crop_param", [dict(axis=2, offset=35), dict(axis=2), None])
def test_a_crop_with_crop_param_does_not_warn(tmp_path, records, crop_param):
    text = str(hed_like(pad=35, crop_param=crop_param).to_proto())
    if crop_param is None:                         # an empty one still says "offset 0"
        text = text.replace('top: "out"\n', 'top: "out"\n  crop_param { }\n')
    assert "crop_param" in text
    _, _, warnings = build(tmp_path, text, records)
    assert warnings == []


def test_zero_offsets_do_not_warn(tmp_path, records):
    assert hand_offset(0) == 0.0
    _, _, warnings = build(tmp_path, hed_like(pad=0), records)
    assert warnings == []


def test_bottoms_without_a_common_ancestor_do_not_warn(tmp_path, records):
    n = caffe.NetSpec()
    n.big = L.Input(shape=dict(dim=[1, 1, 30, 30]))
    n.small = L.Input(shape=dict(dim=[1, 1, H, W]))
    n.conv = L.Convolution(n.big, num_output=1, kernel_size=3, pad=5)
    n.out = L.Crop(n.conv, n.small)
    net, _, warnings = build(tmp_path, n, records)
    assert warnings == [] and net.blobs["out"].data.shape == (1, 1, H, W)


def test_a_layer_without_a_coordinate_map_stops_the_walk(tmp_path, records):
    # Softmax declares no map here (nor does pycaffe's coord_map), so nothing is claimed.
    n = hed_like(pad=35, between=lambda x: L.Softmax(x))
    _, _, warnings = build(tmp_path, n, records)
    assert warnings == []


def test_a_later_crop_counts_an_earlier_one_at_the_forks_offsets(tmp_path, records):
    """The fork's Crop maps by its own derived offset, so a Crop after it is computed with
    that one in place: here 2 (conv k3 pad 3), not 35 + 2."""
    def chained(first_crop):
        n = hed_like(pad=35, crop_param=first_crop)
        n.conv2 = L.Convolution(n.out, num_output=1, kernel_size=3, pad=3)
        n.out2 = L.Crop(n.conv2, n.data)
        return n
    fixed = chained(dict(axis=2, offset=35))
    reference = crop(fixed.conv2, fixed.data)
    _, _, warnings = build(tmp_path, chained(None), records)
    assert [suggested(w) for w in warnings] == [(2, [35]), (2, [2])]
    assert [int(o) for o in reference.fn.params["crop_param"]["offset"]] == [2]
    assert "layer 'out2'" in warnings[1]


def _spot_net(tmp_path, records, crop_param):
    """The HED-like net with a centre-tap conv and an all-ones deconv, fed one bright pixel
    at (r, c): the output's non-zero pixels, and the net."""
    net, _, _ = build(tmp_path, hed_like(pad=35, crop_param=crop_param), records)
    conv_w = np.zeros_like(net.params["conv"][0].data)
    conv_w[..., 1, 1] = 1.0
    net.params["conv"][0].data[...] = conv_w
    net.params["conv"][1].data[...] = 0
    net.params["up"][0].data[...] = 1.0
    net.params["up"][1].data[...] = 0
    return net


@pytest.mark.parametrize("r, c", [(0, 0), (7, 12), (19, 4)])
def test_the_suggested_crop_param_aligns_as_the_fork(tmp_path, records, r, c):
    x = np.zeros((1, 1, H, W), np.float32)
    x[0, 0, r, c] = 1.0
    line = None
    outputs = {}
    for name, crop_param in (("bvlc", None), ("fork", "suggested")):
        if crop_param == "suggested":
            axis, offsets = line
            crop_param = dict(axis=axis, offset=offsets)
        net = _spot_net(tmp_path, records, crop_param)
        if line is None:
            line = suggested(" ".join(r.getMessage() for r in records))
        net.blobs["data"].data[...] = x
        net.forward()
        up = net.blobs["up"].data.copy()
        outputs[name] = net.blobs["out"].data.copy()
    axis, (offset,) = line
    # The fork's Forward_cpu: rows crop_h + h, columns crop_w + w of the upsampled map.
    np.testing.assert_array_equal(outputs["fork"], up[:, :, offset:offset + H, offset:offset + W])
    rows, cols = np.nonzero(outputs["fork"][0, 0])
    # The spot comes back where it went in: the 4x4 deconv footprint covers (r, c).
    assert outputs["fork"][0, 0, r, c] == 1.0
    assert rows.min() >= r - 2 and rows.max() <= r + 2 and cols.min() >= c - 2 and cols.max() <= c + 2
    # With BVLC's offset 0 the spot lands 33+ pixels away: outside the 20x20 output.
    assert not outputs["bvlc"].any()
