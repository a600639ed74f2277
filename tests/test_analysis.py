"""caffe_compat.engine.analysis: receptive fields against closed forms and against autograd, counts,
kernel capacity, and the two tools built on it."""
from __future__ import annotations

import math
import os

import pytest
import torch
from google.protobuf import text_format

from caffe_compat.engine import analysis
from caffe_compat.engine.layers.base import TEST
from caffe_compat.engine.net.module import build_net
from caffe_compat.proto import caffe_pb2
from layer_utils import zero_fillers
from tool_utils import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model(name: str, kind: str = "deploy") -> str:
    return os.path.join(ROOT, "models", name, f"{kind}.prototxt")


def rf(net, blob: str) -> int:
    size = analysis.receptive_field(net, blob).size
    assert size[0] == size[1]
    return size[0]


@pytest.fixture(scope="module")
def vgg16():
    """models/vgg16 deploy, zero-filled: fields and counts do not depend on the values."""
    with pytest.MonkeyPatch.context() as mp:
        zero_fillers(mp)
        net = analysis.load_net(model("vgg16"))
    return net


# ---------------------------------------------------------------------------- closed forms


def test_vgg16_receptive_fields_closed_form(vgg16):
    # 3×3/1 convs add 2·jump, 2×2/2 pools add 1·jump and double it: the last conv of each
    # block sees 5, 14, 40, 92, 196 pixels; the pools 6, 16, 44, 100, 212.
    net = vgg16
    expect = {"conv1_1": 3, "conv1_2": 5, "pool1": 6, "conv2_1": 10, "conv2_2": 14,
              "pool2": 16, "conv3_3": 40, "pool3": 44, "conv4_3": 92, "pool4": 100,
              "conv5_3": 196, "pool5": 212}
    assert {b: rf(net, b) for b in expect} == expect
    stages = analysis.conv_stages(net)
    assert stages[3] == ["conv3_1", "conv3_2", "conv3_3"] and len(stages) == 5
    assert [analysis.jump(net, names[-1]) for names in stages.values()] == \
        [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]


def test_alexnet_receptive_fields_closed_form():
    # conv1 11/4; pool1 3/2: 11+2·4; conv2 5×5: 19+4·8; pool2: 51+2·8; conv3-5 3×3 at jump 16.
    net = analysis.load_net(model("alexnet"))
    expect = {"conv1": 11, "pool1": 19, "conv2": 51, "pool2": 67, "conv3": 99, "conv4": 131,
              "conv5": 163, "pool5": 195}
    assert {b: rf(net, b) for b in expect} == expect


def test_vgg16_counts_closed_form(vgg16):
    net = vgg16
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = list(zip([3] + widths[:-1], widths))
    params = sum(9 * i * o + o for i, o in convs) + (25088 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert params + 4096 * 1000 + 1000 == 138_357_544          # the published VGG16 count
    assert analysis.param_count(net) == params + 4096 * 10 + 10
    sizes = [224] * 2 + [112] * 2 + [56] * 3 + [28] * 3 + [14] * 3
    macs = sum(s * s * 9 * i * o for s, (i, o) in zip(sizes, convs))
    macs += 25088 * 4096 + 4096 * 4096 + 4096 * 10
    assert analysis.total_macs(net) == macs                   # 15.47 G at 1000 classes


# ---------------------------------------------------------------------------- brute force


def _gradient_extent(net, blob: str, positions, size: int) -> int:
    """Largest number of input rows a single position of ``blob`` gets a gradient from."""
    best = 0
    for y in positions:
        x = torch.rand(1, 3, size, size, dtype=torch.float64) + 0.5
        x.requires_grad_(True)
        blobs = net.run({"data": x})
        blobs[blob][0, :, y, blobs[blob].shape[-1] // 2].sum().backward()
        rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3))).flatten()
        assert 0 < rows[0] and rows[-1] < size - 1, "field clipped by the border: enlarge the input"
        best = max(best, int(rows[-1] - rows[0]) + 1)
    return best


def _positive(net) -> None:
    """All weights positive and averaging, so every dependency carries a non-zero gradient."""
    with torch.no_grad():
        for layer in net.layers:
            for p in layer.blobs:
                p.copy_((torch.rand_like(p) + 0.5) / max(1, p[0].numel()))


def _all_ave(param: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    for lp in param.layer:                    # MAX pooling sends the gradient to one pixel only
        if lp.type == "Pooling":
            lp.pooling_param.pool = caffe_pb2.PoolingParameter.AVE
    return param


SMALL = """
name: "branches"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 96 dim: 96 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "c2" type: "Convolution" bottom: "p1" top: "c2"
        convolution_param { num_output: 4 kernel_size: 3 dilation: 2 pad: 2 } }
layer { name: "p2" type: "Pooling" bottom: "c2" top: "p2"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "up" type: "Deconvolution" bottom: "p2" top: "up"
        convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 4 } }
layer { name: "sum" type: "Eltwise" bottom: "c2" bottom: "up" top: "sum" }
layer { name: "up4" type: "Deconvolution" bottom: "sum" top: "up4"
        convolution_param { num_output: 1 kernel_size: 4 stride: 4 } }
layer { name: "att" type: "Pooling" bottom: "up4" top: "att"
        pooling_param { pool: AVE kernel_size: 8 stride: 8 } }
layer { name: "sig" type: "Sigmoid" bottom: "att" top: "sig" }
layer { name: "tile" type: "Tile" bottom: "sig" top: "tile" tile_param { tiles: 2 } }
layer { name: "c3" type: "Convolution" bottom: "p2" top: "c3"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "prod" type: "Eltwise" bottom: "c3" bottom: "tile" top: "prod"
        eltwise_param { operation: PROD } }
layer { name: "cat" type: "Concat" bottom: "prod" bottom: "p2" top: "cat" }
layer { name: "c4" type: "Convolution" bottom: "cat" top: "c4"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 } }
"""


@pytest.mark.parametrize("blob", ["c2", "up", "sum", "up4", "att", "prod", "c4"])
def test_receptive_field_matches_autograd_on_branches(blob):
    torch.manual_seed(0)
    net = build_net(text_format.Parse(SMALL, caffe_pb2.NetParameter()), TEST).double()
    _positive(net)
    n = net.blob_shapes[blob][2]
    field = rf(net, blob)
    assert _gradient_extent(net, blob, range(n // 2 - 4, n // 2 + 4), 96) == field


def test_receptive_field_of_vgg16_landmark_64_matches_autograd():
    # The fused attention path makes conv4 see further than plain VGG16 (124 > 92).
    torch.manual_seed(0)
    param = analysis.data_as_input(
        text_format.Parse(open(model("vgg16_landmark_64")).read(), caffe_pb2.NetParameter()))
    param.layer[0].input_param.shape[0].dim[2:] = [192, 192]
    net = build_net(_all_ave(param), TEST).double()
    _positive(net)
    assert rf(net, "conv4_3") == 124
    assert _gradient_extent(net, "conv4_3", (11, 12), 192) == 124


# ---------------------------------------------------------------------------- capacity


def test_kernel_capacity_bounds():
    eye = torch.eye(8).reshape(8, 2, 2, 2)                  # orthonormal rows: every direction
    assert analysis.kernel_capacity(eye) == pytest.approx(1.0)
    rank1 = torch.outer(torch.arange(1.0, 9.0), torch.ones(18)).reshape(8, 2, 3, 3)
    assert analysis.kernel_capacity(rank1) == pytest.approx(1 / 8)
    s = torch.tensor([3.0, 1.0])                            # exp(entropy of (3/4, 1/4)) / 2
    m = torch.diag(s).reshape(2, 2, 1, 1)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert analysis.kernel_capacity(m) == pytest.approx(math.exp(h) / 2)
    assert analysis.kernel_capacity(torch.zeros(4, 3, 3, 3)) == 0.0


def test_stage_report_alexnet_64():
    net = analysis.load_net(model("alexnet_64"))
    report = analysis.analyse(net)
    assert [s.layers for s in report.stages] == [["conv1"], ["conv2"], ["conv3"], ["conv4"],
                                                 ["conv5"]]
    assert report.relative_capacity()[0] == 1.0
    assert sum(s.params for s in report.stages) + sum(
        analysis.layer_params(net, n) for n in ("fc6", "fc7", "fc8")) == report.params
    conv2 = net.layers[net.layer_index("conv2")]
    assert report.stages[1].macs == 14 * 14 * 64 * (24 // 2) * 25 == \
        analysis.layer_macs(net, "conv2")
    assert conv2.group == 2


def test_data_layers_become_inputs():
    net = analysis.load_net(model("vgg16_landmark_64", "train_val"), phase=0)
    assert net.blob_shapes["data"] == (20, 3, 64, 64)
    assert net.blob_shapes["label"] == (20,)
    assert net.blob_shapes["landmarks"] == (20, 8, 3)
    assert net.blob_shapes["heatmap_target"] == (20, 8, 64, 64)


# ---------------------------------------------------------------------------- tools


def _tool(name: str, *args: str) -> int:
    """Run tools/<name>.py's main() in this process (no second torch import)."""
    return load_tool(name).main(list(args))


def test_net_analysis_tool(tmp_path, capsys):
    out = tmp_path / "t.md"
    assert _tool("net_analysis", model("alexnet_64"), "--markdown", "--out", str(out)) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert text.startswith("# Per-stage analysis")
    assert "Made by `python tools/net_analysis.py" in text
    assert "| conv5 | conv5 | 83 | 8 |" in text and "710,698 parameters" in text
    with pytest.raises(SystemExit):
        _tool("net_analysis", "nope.prototxt")
    assert "nope.prototxt: no such file" in capsys.readouterr().err


def test_draw_net_tool(tmp_path):
    out = tmp_path / "net.png"
    assert _tool("draw_net", model("vgg16_landmark_64", "train_val"), str(out)) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
