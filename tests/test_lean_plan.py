"""The lean plan (engine/net/train_fuse.py): runs that keep no intermediate blob compute what
the layer-by-layer plan computes — outputs, every gradient, BatchNorm's running sums — and
real Caffe's values on the BatchNorm + Scale golden."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers.base import TRAIN
from caffe_compat.engine.net.folded import InPlaceReLU
from caffe_compat.engine.net.module import build_net
from caffe_compat.engine.net.train_fuse import NormalizeAffine
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2
from test_cli_train import DUMMY_NET, write_solver
from test_fuse import _conv, resnet_style

GOLDENS = Path(__file__).parent / "goldens" / "layers"


def _kinds(net) -> dict[str, str]:
    """Layer name -> what the lean plan runs for it."""
    kinds = {}
    for step in net.lean_plan():
        fn = step.fn
        kind = ("fused" if isinstance(fn, NormalizeAffine) else
                "in place" if isinstance(fn, InPlaceReLU) else
                "alias" if fn is None else "layer")
        kinds[net.layer_names[step.index]] = kind
    return kinds


def training_net() -> str:
    """tiny ResNet of test_fuse as a training net, with the cases the rules must refuse."""
    text = resnet_style().replace("dim: 2 dim: 3 dim: 16 dim: 16", "dim: 4 dim: 3 dim: 16 dim: 16")
    text = text.replace('layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n', "")
    text += ('layer { name: "label" type: "Input" top: "label" '
             'input_param { shape { dim: 4 } } }\n'
             'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" '
             'top: "loss" }\n')
    # Frozen statistics in TRAIN (fine-tuning a ResNet): fused with training=False.
    text += _conv("g", "data", 4, bias=False)
    text += ('layer { name: "bn_g" type: "BatchNorm" bottom: "g" top: "g" '
             'batch_norm_param { use_global_stats: true } }\n'
             'layer { name: "scale_g" type: "Scale" bottom: "g" top: "g" }\n'
             'layer { name: "relu_g" type: "ReLU" bottom: "g" top: "g" }\n')
    # A BatchNorm top that is also an output: not fused. A ReLU on a Split top: not in place.
    text += _conv("h", "data", 4, bias=False)
    text += ('layer { name: "bn_h" type: "BatchNorm" bottom: "h" top: "hn" }\n'
             'layer { name: "scale_h" type: "Scale" bottom: "hn" top: "hs" }\n'
             'layer { name: "relu_h" type: "ReLU" bottom: "hs" top: "hr" }\n'
             'layer { name: "relu_h2" type: "ReLU" bottom: "hs" top: "hr2" }\n'
             'layer { name: "sum_h" type: "Eltwise" bottom: "hr" bottom: "hr2" bottom: "g" '
             'top: "sum_h" }\n'
             'layer { name: "loss_h" type: "EuclideanLoss" bottom: "sum_h" bottom: "hn" '
             'top: "loss_h" loss_weight: 0.1 }\n')
    return text


def build(text: str, seed: int = 0):
    torch.manual_seed(seed)
    net = build_net(read_text_proto(text, caffe_pb2.NetParameter), TRAIN, source="<test>")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in net.layers:
            if layer.type == "BatchNorm":    # statistics as after a few iterations
                layer.blobs[0].copy_(torch.randn(layer.channels, generator=gen) * 2)
                layer.blobs[1].copy_(0.5 + torch.rand(layer.channels, generator=gen) * 4)
                layer.blobs[2].fill_(2.0)
    return net


def _feed(net, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return {"data": torch.randn(*net.blob_shapes["data"], generator=gen, dtype=dtype),
            "label": torch.randint(0, 5, (4,), generator=gen).to(dtype)}


def _step(net, feed, lean: bool, cast=None):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=cast, enabled=cast is not None):
        if lean:
            loss, outputs = net.forward_loss(**feed)
        else:
            blobs = net.run(feed, keep_all=True)
            loss, outputs = net.loss(blobs), {n: blobs[n] for n in net.output_names}
    loss.float().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach(), outputs, grads


def test_plan_fuses_and_refuses_where_the_rules_say():
    kinds = _kinds(build(training_net()))
    for name in ("bn_conv1", "bn_b1", "bn_b2", "bn_proj", "bn_g"):
        assert kinds[name] == "fused", name
        assert f"scale_{name[3:]}" not in kinds          # absorbed into the BatchNorm's step
    assert kinds["bn_h"] == "layer"          # its top is read by the loss as well
    assert kinds["bn3"] == "layer"           # followed by a Bias, not a Scale
    for name in ("relu_conv1", "relu_b1", "relu_sum", "relu_g", "lrelu3"):
        assert kinds[name] == "in place", name
    assert kinds["relu_h"] == kinds["relu_h2"] == "layer"   # both read one Split's tensor
    assert "alias" in kinds.values()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_step_equals_layer_by_layer(dtype):
    full = build(training_net())
    lean = copy.deepcopy(full)
    full.to(dtype), lean.to(dtype)
    feed = _feed(full, dtype)
    for _ in range(2):               # the second step sees the first one's running sums
        want_loss, want_out, want_grads = _step(full, feed, lean=False)
        loss, out, grads = _step(lean, feed, lean=True)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert abs(float(loss) - float(want_loss)) <= tol * abs(float(want_loss))
    assert set(out) == set(want_out)
    assert set(grads) == set(want_grads)
    # A bias right before a BatchNorm has a gradient that is zero up to rounding: compare
    # each gradient against its own size, but never below the largest one's rounding.
    floor = max(float(g.abs().max()) for g in want_grads.values())
    for name, want in want_grads.items():
        scale = max(float(want.abs().max()), 1e-3 * floor)
        assert float((grads[name] - want).abs().max()) <= tol * scale, name
    for (name, a), (_, b) in zip(full.state_dict().items(), lean.state_dict().items()):
        assert torch.allclose(a, b, rtol=tol, atol=tol), f"state {name}"


def test_bf16_step_keeps_statistics_in_float32():
    full = build(training_net())
    lean = copy.deepcopy(full)
    feed = _feed(full)
    want_loss, _, want_grads = _step(full, feed, lean=False, cast=torch.bfloat16)
    loss, _, grads = _step(lean, feed, lean=True, cast=torch.bfloat16)
    assert abs(float(loss) - float(want_loss)) <= 0.02 * abs(float(want_loss))
    floor = max(float(g.norm()) for g in want_grads.values())
    for name, want in want_grads.items():
        rel = float((grads[name] - want).norm() / max(float(want.norm()), 1e-2 * floor))
        assert rel < 0.05, f"{name}: relative error {rel:.3g} against the float32 BatchNorm"
    for layer in lean.layers:
        if layer.type == "BatchNorm":
            assert all(b.dtype == torch.float32 for b in layer.blobs)
    bn = dict(lean.named_layers())["bn_conv1"]
    ref = dict(full.named_layers())["bn_conv1"]
    # Both normalised the same bf16 convolution output; the sums agree to float32 rounding
    # of bf16 inputs, far tighter than a bf16 accumulation would give.
    assert torch.allclose(bn.blobs[0], ref.blobs[0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(bn.blobs[1], ref.blobs[1], rtol=1e-4, atol=1e-4)


def test_in_place_relu_never_overwrites_what_another_layer_reads():
    # conv top read by a ReLU and by a second branch (via Split), and an InnerProduct top
    # that is itself a loss (loss_weight) and read by a ReLU: neither ReLU may write it.
    text = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n')
    text += _conv("c", "data", 4)
    text += ('layer { name: "r" type: "ReLU" bottom: "c" top: "r" }\n'
             'layer { name: "t" type: "TanH" bottom: "c" top: "t" }\n'
             'layer { name: "s" type: "Eltwise" bottom: "r" bottom: "t" top: "s" }\n'
             'layer { name: "fc" type: "InnerProduct" bottom: "s" top: "fc" loss_weight: 0.5 '
             'inner_product_param { num_output: 3 weight_filler { type: "gaussian" } '
             'bias_filler { type: "constant" value: -0.5 } } }\n'
             'layer { name: "r2" type: "ReLU" bottom: "fc" top: "fc_relu" }\n')
    net = build(text)
    assert _kinds(net)["r"] == _kinds(net)["r2"] == "layer"
    x = torch.randn(2, 3, 8, 8)
    loss, out = net.forward_loss(data=x)
    blobs = net.run({"data": x})
    assert (blobs["fc"] < 0).any()         # a rectified fc would change the loss
    assert torch.equal(loss, 0.5 * blobs["fc"].sum())
    assert torch.equal(out["fc_relu"], torch.relu(blobs["fc"]))
    assert torch.equal(blobs["s"], torch.relu(blobs["c"]) + torch.tanh(blobs["c"]))


def test_fused_batchnorm_scale_matches_caffe():
    """Real Caffe's forward, backward and running sums for BatchNorm + Scale (TRAIN)."""
    case = GOLDENS / "batchnorm_scale_train"
    net = caffe.Net(str(case / "net.prototxt"), str(case / "init.caffemodel"), caffe.TRAIN)
    module = net.module
    assert _kinds(module)["bn"] == "fused"
    golden = np.load(case / "golden.npz")
    x = torch.from_numpy(golden["in/data"]).requires_grad_()
    out = module.forward(data=x)["out"]
    np.testing.assert_allclose(out.detach().numpy(), golden["blob/out"], rtol=1e-4, atol=1e-5)
    out.backward(torch.from_numpy(golden["top_diff/out"]))
    np.testing.assert_allclose(x.grad.numpy(), golden["diff/data"], rtol=1e-3, atol=1e-5)
    bn, scale = (dict(module.named_layers())[n] for n in ("bn", "scale"))
    for i in range(3):
        np.testing.assert_allclose(bn.blobs[i].detach().numpy(), golden[f"param/bn/{i}"],
                                   rtol=1e-4, atol=1e-5, err_msg=f"bn blob {i}")
    for i in range(2):
        np.testing.assert_allclose(scale.blobs[i].grad.numpy(), golden[f"param_diff/scale/{i}"],
                                   rtol=1e-3, atol=1e-5, err_msg=f"scale diff {i}")


def test_relu_after_convolution_is_in_place_without_view_history():
    """A view rectified in place makes autograd rebuild its base's history (CopySlices, a
    zero-filled base gradient: 20x slower ReLU backward on VGG16); convolution and inner
    product tops are therefore no views, and a view is never rectified in place."""
    text = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n')
    text += _conv("c", "data", 4) + 'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
    text += ('layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc" '
             'inner_product_param { num_output: 3 } }\n'
             'layer { name: "r2" type: "ReLU" bottom: "fc" top: "fc" }\n'
             'layer { name: "t" type: "TanH" bottom: "fc" top: "t" }\n')
    net = build(text)
    assert _kinds(net)["r"] == _kinds(net)["r2"] == "in place"
    out = net.forward(data=torch.randn(2, 3, 8, 8))["t"]
    names, todo, seen = [], [out.grad_fn], set()
    while todo:                                  # every node of the backward graph
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    assert "CopySlices" not in names and "AsStridedBackward0" not in names, names
    assert names.count("ReluBackward0") == 2, names
    layers = dict(net.named_layers())
    x = torch.randn(2, 3, 8, 8)
    assert not layers["c"](x)._is_view() and not layers["fc"](layers["c"](x))._is_view()
    view = torch.randn(4, 3, requires_grad=True).clone().view(12)
    before = view.detach().clone()
    InPlaceReLU(dict(net.named_layers())["r"])(view)
    assert torch.equal(view.detach(), before)      # the guard made a new tensor instead


def test_lean_plan_traces_as_one_graph_for_compile():
    """--compile traces the lean plan: a graph break inside a layer (an eager-only check in
    the in-place ReLU once did this) makes dynamo compile every layer's forward apart and
    hit its recompile limit, slower than eager."""
    text = training_net().split('layer { name: "label"')[0]       # Input-fed, no loss
    net = build(text)
    x = torch.randn(*net.blob_shapes["data"])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(net.forward)(data=x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# test_cli_train's DummyData net on random data, with BatchNorm + Scale before its ReLU
SOLVER_NET = DUMMY_NET.replace(
    'data_filler { type: "constant" value: 0.5 }', 'data_filler { type: "gaussian" std: 1 }'
).replace('layer { name: "relu1"',
          'layer { name: "bn" type: "BatchNorm" bottom: "conv1" top: "conv1" }\n'
          'layer { name: "scale" type: "Scale" bottom: "conv1" top: "conv1" '
          'scale_param { bias_term: true } }\nlayer { name: "relu1"')


def test_pycaffe_step_runs_lean_until_its_last_iteration(tmp_path):
    """solver.step(n) exposes the blobs of its last iteration only, so the others take the
    lean plan; weights, statistics and those blobs equal n calls of step(1)."""
    solver = write_solver(tmp_path, SOLVER_NET, net=f'"{tmp_path / "net.prototxt"}"',
                          test_iter=None, test_interval=None, lr_policy='"fixed"',
                          display=0, snapshot=0, random_seed=11)
    # one after the other: DummyData draws from the generator the solver seeds
    a = caffe.get_solver(str(solver))
    a.step(4)
    b = caffe.get_solver(str(solver))
    for _ in range(4):
        b.step(1)
    for name in a.net.params:
        for i, blob in enumerate(a.net.params[name]):
            np.testing.assert_allclose(blob.data, b.net.params[name][i].data, rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}/{i}")
    for name in ("conv1", "ip1", "loss"):
        np.testing.assert_allclose(a.net.blobs[name].data, b.net.blobs[name].data,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert (a.net.blobs["conv1"].data >= 0).all() and a.net.blobs["conv1"].data.any()
    assert _kinds(a.net.module)["bn"] == "fused"

