"""bf16 autocast (`--precision bf16`): the heavy layers run in bf16, losses, accuracies,
softmax and batch statistics in float32, and the net still trains."""
from __future__ import annotations

import pytest
import torch

from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.engine.net.module import build_net
from caffe_compat.proto import caffe_pb2

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
    conv = record["conv"].float()              # the bf16 conv output BatchNorm was given
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
