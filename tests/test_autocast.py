"""bf16 autocast (`--precision bf16`): the heavy layers run in bf16, losses, accuracies,
softmax and batch statistics in float32, and the net still trains."""
from __future__ import annotations

import pytest
import torch

from caffe_compat.commands.device import DeviceChoice, autocast
from caffe_compat.engine import weights
from caffe_compat.engine.net.module import build_net
from caffe_compat.engine.solver.base import Solver
from caffe_compat.engine.solver.params import read_solver_param
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

BF16 = DeviceChoice("cpu", [], "bf16")      # what `--precision bf16` resolves to on a CPU

NET = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 30 dim: 3 dim: 12 dim: 12 } shape { dim: 30 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture
def net_and_batch():
    torch.manual_seed(0)
    net = build_net(read_text_proto(NET, caffe_pb2.NetParameter), phase=0)
    x = torch.randn(30, 3, 12, 12)
    label = torch.randint(0, 7, (30,)).float()
    return net, x, label


def test_losses_and_accuracy_stay_float32_under_bf16(net_and_batch):
    net, x, label = net_and_batch
    record: dict[str, torch.Tensor] = {}
    with torch.autocast("cpu", torch.bfloat16):
        blobs = net.run({"data": x, "label": label}, record=record)
    assert record["conv"].dtype == torch.bfloat16 and blobs["fc"].dtype == torch.bfloat16
    for name in ("loss", "acc", "prob"):
        assert blobs[name].dtype == torch.float32, name
    logits = blobs["fc"].float()               # the same bf16 scores, judged in float32
    expected = torch.nn.functional.cross_entropy(logits, label.long())
    torch.testing.assert_close(blobs["loss"], expected, rtol=1e-6, atol=1e-6)
    correct = int((logits.argmax(1) == label.long()).sum())
    assert blobs["acc"].item() == pytest.approx(correct / 30, abs=1e-7)   # k/30, not bf16's
    torch.testing.assert_close(blobs["prob"], torch.softmax(logits, 1))


def test_batch_norm_statistics_accumulate_in_float32(net_and_batch):
    net, x, label = net_and_batch
    by_name = {layer.name: layer for layer in net.layers}
    bn, conv_layer = by_name["bn"], by_name["conv"]
    record: dict[str, torch.Tensor] = {}
    with torch.autocast("cpu", torch.bfloat16):
        net.run({"data": x, "label": label}, record=record)
    conv = record["conv"].detach().float()              # the bf16 conv output BatchNorm was given
    assert all(b.dtype == torch.float32 for b in bn.blobs)
    torch.testing.assert_close(bn.blobs[0].detach(), conv.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_trains_under_bf16(net_and_batch):
    net, x, label = net_and_batch
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", torch.bfloat16):
            loss, _ = net.forward_loss(data=x, label=label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert loss.dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)


def test_weights_changed_inside_one_autocast_context_are_used(net_and_batch):
    """The commands wrap a whole run in one ``devices.autocast``; the solver updates the
    float32 weights in place inside it. A forward after the update must compute with the new
    weights (autocast's weight cache once kept the first forward's bf16 copies for the whole
    run, so convolutions and InnerProducts never changed)."""
    net, x, label = net_and_batch
    conv = next(layer for layer in net.layers if layer.name == "conv")
    with autocast(BF16):
        before = net.run({"data": x, "label": label})["conv"].detach().float()
        with torch.no_grad():
            conv.blobs[0].mul_(-1.0)
        after = net.run({"data": x, "label": label})["conv"].detach().float()
    with autocast(BF16):
        fresh = net.run({"data": x, "label": label})["conv"].detach().float()
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert float((after - before).abs().max()) > 0.1


def test_solver_steps_in_one_autocast_context_match_their_snapshot(tmp_path):
    """Train under one bf16 context as `caffe train` does, then score the live net inside
    it and a net restored from the snapshot outside: the same weights, so the same loss up
    to bf16 rounding (with the stale cache the live net scored stale weights)."""
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(NET)
    torch.manual_seed(0)
    x = torch.randn(30, 3, 12, 12)
    label = torch.randint(0, 7, (30,)).float()
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{net_file}"\nbase_lr: 0.2\nmomentum: 0.9\nlr_policy: "fixed"\nmax_iter: 40\n'
        f'random_seed: 1\nsnapshot_prefix: "{tmp_path}/snap"\n')
    solver = Solver(read_solver_param(str(tmp_path / "solver.prototxt")))
    solver.input_tensors[0] = {"data": x, "label": label}
    with autocast(BF16):
        solver.step(40)
        with torch.no_grad():
            live, _ = solver.train_module.forward_loss(data=x, label=label)
    model, _ = solver.snapshot()
    net = build_net(read_text_proto(NET, caffe_pb2.NetParameter), phase=0)
    weights.copy_from(net, model)
    with torch.no_grad(), autocast(BF16):
        restored, _ = net.forward_loss(data=x, label=label)
    assert float(live) < 1.0
    assert float(restored) == pytest.approx(float(live), rel=0.05, abs=0.02)
