"""tools/export.py: TorchScript and ONNX exports equal the net (ONNX run by onnxruntime)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.engine import weights

sys.path.insert(0, str(Path(__file__).parent))
from test_fuse import build, resnet_style  # noqa: E402
from tool_utils import load_tool  # noqa: E402

TWO_INPUTS = ('name: "two" layer { name: "in" type: "Input" top: "b" top: "a" input_param { '
              'shape { dim: 1 dim: 2 dim: 4 dim: 4 } shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
              'layer { name: "c" type: "Convolution" bottom: "a" top: "c" convolution_param { '
              'num_output: 3 kernel_size: 3 weight_filler { type: "msra" } } }\n'
              'layer { name: "d" type: "Convolution" bottom: "b" top: "d" convolution_param { '
              'num_output: 3 kernel_size: 3 weight_filler { type: "msra" } } }\n'
              'layer { name: "e" type: "Eltwise" bottom: "c" bottom: "d" top: "e" '
              'eltwise_param { operation: PROD } }\n')


@pytest.fixture
def deploy(tmp_path):
    net = build(resnet_style())
    (tmp_path / "deploy.prototxt").write_text(resnet_style())
    weights.save(net, str(tmp_path / "w.caffemodel"))
    return net, tmp_path


def run_export(*argv):
    return load_tool("export").main([str(a) for a in argv])


def reference(net, x):
    with torch.no_grad():
        return net(data=x)["prob"].numpy()


def test_torchscript_export_equals_net(deploy, capsys):
    net, d = deploy
    out = d / "net.pt"
    assert run_export("--model", d / "deploy.prototxt", "--weights", d / "w.caffemodel",
                      "--format", "torchscript", out) == 0
    assert "inputs: data; outputs: prob" in capsys.readouterr().out
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    (prob,) = torch.jit.load(str(out))(x)
    assert np.abs(prob.numpy() - reference(net, x)).max() <= 1e-5


def test_onnx_export_runs_in_onnxruntime(deploy):
    ort = pytest.importorskip("onnxruntime")
    net, d = deploy
    out = d / "net.onnx"
    assert run_export("--model", d / "deploy.prototxt", "--weights", d / "w.caffemodel",
                      "--format", "onnx", out) == 0
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["prob"]
    (prob,) = session.run(None, {"data": x.numpy()})
    assert np.abs(prob - reference(net, x)).max() <= 1e-5


def test_inputs_keep_prototxt_order(tmp_path):
    (tmp_path / "two.prototxt").write_text(TWO_INPUTS)
    net = build(TWO_INPUTS)
    weights.save(net, str(tmp_path / "two.caffemodel"))
    out = tmp_path / "two.pt"
    assert run_export("--model", tmp_path / "two.prototxt", "--weights",
                      tmp_path / "two.caffemodel", "--format", "torchscript", out) == 0
    a, b = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    (e,) = torch.jit.load(str(out))(b, a)           # "b" is declared first
    with torch.no_grad():
        assert torch.allclose(e, net(a=a, b=b)["e"], atol=1e-5)


def test_failed_check_writes_nothing(deploy, capsys):
    _, d = deploy
    out = d / "net.pt"
    assert run_export("--model", d / "deploy.prototxt", "--format", "torchscript",
                      "--tolerance", "-1", out) == 1
    assert "more than --tolerance" in capsys.readouterr().err
    assert not out.exists() and not list(d.glob(".net.pt*"))


def test_bad_inputs_are_one_line(tmp_path, capsys):
    assert run_export("--model", tmp_path / "nope.prototxt", "--format", "onnx",
                      tmp_path / "x.onnx") == 1
    assert "nope.prototxt: no such file" in capsys.readouterr().err
    (tmp_path / "data.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: 1 } } }')
    assert run_export("--model", tmp_path / "data.prototxt", "--format", "onnx",
                      tmp_path / "x.onnx") == 1
    assert "no Input layer" in capsys.readouterr().err
