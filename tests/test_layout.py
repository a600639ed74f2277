"""``--layout`` (engine/layout.py): NHWC strides change the speed, never the result."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caffe_compat.commands.logparse import parse_log
from caffe_compat.engine import layout
from caffe_compat.engine.layers.base import TRAIN
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2
from test_cli_train import run_train, weights_of, workdir, write_solver  # noqa: F401

# Random data each iteration (DummyData refills gaussian fillers on every forward, from the
# solver's seed), two 3x3 convolutions with pooling between them: every kernel whose layout
# matters, forward and backward.
CONV_NET = """
name: "convs"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv2" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


def _train(workdir, prefix: str, *flags: str, net: str = CONV_NET, **solver) -> dict:
    fields = dict(max_iter=6, snapshot=3, test_interval=3, snapshot_prefix=f'"{prefix}/run"')
    path = write_solver(workdir, net, name=f"{prefix}.prototxt", **{**fields, **solver})
    assert run_train(["--solver", str(path), "--no-plot", *flags]) == 0
    last = solver.get("max_iter", fields["max_iter"])
    return weights_of(workdir / f"{prefix}/run_iter_{last}.caffemodel")


def test_auto_takes_nhwc_only_past_the_margin():
    fast = layout.decide_layout("cpu", "bf16", probe=lambda d, p: 1.9)
    assert fast.layout == "nhwc" and fast.speedup == 1.9 and "1.90x" in fast.reason
    assert "bf16" in fast.reason
    assert layout.decide_layout("cpu", probe=lambda d, p: 1.05).layout == "nchw"
    assert layout.decide_layout("cpu", probe=lambda d, p: 0.7).layout == "nchw"


def test_auto_keeps_nchw_when_the_probe_fails():
    def broken(device, precision):
        raise RuntimeError("no channels-last kernel\ndetails")
    d = layout.decide_layout("cpu", probe=broken)
    assert d.layout == "nchw" and "no channels-last kernel" in d.reason and d.speedup is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_probe_measures_both_layouts(precision):
    speedup = layout.probe_layout_speedup(torch.device("cpu"), precision, repeats=1)
    assert math.isfinite(speedup) and speedup > 0


def test_apply_layout_changes_strides_not_shapes():
    net = build_net(read_text_proto(CONV_NET, caffe_pb2.NetParameter), TRAIN)
    blobs = dict(net.named_layers())
    shapes = {n: [tuple(p.shape) for p in blobs[n].blobs] for n in ("conv1", "conv2")}
    assert layout.apply_layout(net, "nhwc") == 2          # the two 4-D conv weights
    w = blobs["conv1"].blobs[0]
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert {n: [tuple(p.shape) for p in blobs[n].blobs] for n in shapes} == shapes
    assert layout.apply_layout(net, "nhwc") == 0          # already there
    assert layout.apply_layout(net, "nchw") == 2 and w.is_contiguous()
    with pytest.raises(ValueError, match="layout 'nwhc'"):
        layout.apply_layout(net, "nwhc")


def test_nhwc_training_matches_nchw(workdir, capsys):
    nchw = _train(workdir, "nchw")
    nhwc = _train(workdir, "nhwc", "--layout", "nhwc")
    err = capsys.readouterr().err
    assert "Layout nhwc: 2 weight blobs stored channels-last" in err
    assert nchw.keys() == nhwc.keys()
    for name in nchw:
        for a, b in zip(nchw[name], nhwc[name]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
    # The test net shares the train net's (channels-last) weights: same accuracy and loss.
    logs = [parse_log(workdir / f"{p}/run.log") for p in ("nchw", "nhwc")]
    tests = [[(r.iter, r.outputs) for r in log.test] for log in logs]
    assert [it for it, _ in tests[0]] == [0, 3, 6] == [it for it, _ in tests[1]]
    for (_, a), (_, b) in zip(*tests):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)


def test_nhwc_resume_continues_the_same_run(workdir, capsys):
    # Constant data: a resumed run does not replay the filler's random stream (nor does Caffe).
    net = CONV_NET.replace('type: "gaussian" std: 1', 'type: "constant" value: 0.3')
    full = _train(workdir, "full", "--layout", "nhwc", net=net)
    _train(workdir, "part", "--layout", "nhwc", net=net, max_iter=3)
    resumed = _train(workdir, "part", "--layout", "nhwc", "--snapshot",
                     "part/run_iter_3.solverstate", net=net, max_iter=6)
    for name in full:
        for a, b in zip(full[name], resumed[name]):
            np.testing.assert_array_equal(b, a, err_msg=name)


def test_auto_logs_its_decision(workdir, capsys):
    _train(workdir, "auto", "--layout", "auto", max_iter=6)
    err = capsys.readouterr().err
    assert "--layout auto: " in err and ("nhwc: " in err or "nchw: " in err)


def test_unknown_layout_is_refused(workdir, capsys):
    path = write_solver(workdir, CONV_NET)
    with pytest.raises(SystemExit):
        run_train(["--solver", str(path), "--layout", "nwhc"])
    assert "invalid choice: 'nwhc'" in capsys.readouterr().err
