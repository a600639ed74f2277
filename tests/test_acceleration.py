"""engine/acceleration.py (--compile, channels_last) and engine/gpu.py CPU fallbacks."""
import sys
from pathlib import Path

import torch

from caffe_compat.engine import acceleration, gpu
from caffe_compat.engine.layers.base import TRAIN
from caffe_compat.engine.weights import net_to_proto

sys.path.insert(0, str(Path(__file__).parent))
from test_fuse import build, resnet_style  # noqa: E402

LOSS = ('layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }\n')


def train_net():
    return build(resnet_style().replace('layer { name: "prob"', '# layer { name: "prob"') + LOSS,
                 phase=TRAIN)


def feed():
    gen = torch.Generator().manual_seed(5)
    return {"data": torch.randn(2, 3, 16, 16, generator=gen), "label": torch.tensor([1.0, 3.0])}


def step(net):
    loss, _ = net.forward_loss(**feed())
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_compile_routes_forward_loss_and_matches_eager():
    ref_loss, ref_grads = step(train_net())
    net = train_net()
    wrapper = acceleration.compile_for_training(net, backend="aot_eager")
    assert net.forward_loss is wrapper and acceleration.compile_for_training(net) is wrapper
    loss, grads = step(net)
    assert wrapper.active and abs(loss - ref_loss) <= 1e-5 * max(1, abs(ref_loss))
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name
    acceleration.uncompile(net)
    assert not isinstance(net.forward_loss, acceleration.CompiledForward)


def test_compile_failure_warns_once_and_runs_eagerly():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")
    messages = []
    ref_loss, _ = step(train_net())
    net = train_net()
    wrapper = acceleration.compile_for_training(net, backend=broken_backend, warn=messages.append)
    loss, _ = step(net)
    loss2, _ = step(net)
    assert not wrapper.active and len(messages) == 1
    assert "no C++ compiler here" in messages[0] and "without compilation" in messages[0]
    assert abs(loss - ref_loss) <= 1e-6 * max(1, abs(ref_loss))


def test_train_cli_compile_flag_falls_back_with_a_warning(tmp_path, monkeypatch, capsys):
    from test_cli_train import run_train, write_solver
    monkeypatch.chdir(tmp_path)

    def no_compile(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")
    monkeypatch.setattr(torch, "compile", no_compile)
    solver = write_solver(tmp_path, max_iter=4, snapshot=0, test_interval=2, display=2)
    assert run_train(["--solver", str(solver), "--compile", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "--compile: torch.compile" in err and "not supported on this Python" in err
    assert "Optimization Done." in err


def test_channels_last_keeps_values_and_caffemodel_bytes():
    net = build(resnet_style())
    x = feed()["data"]
    with torch.no_grad():
        ref = net(data=x)
    before = net_to_proto(net).SerializeToString()
    assert acceleration.to_channels_last(net) > 0
    conv = net.layers[net.layer_index("conv1")].blobs[0]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with torch.no_grad():
        out = net(data=x)
    for k in ref:
        assert torch.allclose(out[k], ref[k], atol=1e-5), k
    assert net_to_proto(net).SerializeToString() == before
    assert acceleration.to_contiguous(net) > 0 and conv.is_contiguous()


def test_gpu_paths_fall_back_on_cpu():
    assert gpu.configure_cuda("cpu") is False
    t = torch.arange(4.0)
    assert gpu.host_to_device(t, "cpu") is t
    if not torch.cuda.is_available():
        assert gpu.graph_unsupported_reason([t]) == "CUDA is not available"
    calls = []

    def fn(x):
        calls.append(x.shape)
        return (x * 2,)
    graphed = gpu.GraphedInference(fn, [t])
    if not torch.cuda.is_available():
        assert graphed.graph is None and graphed.reason and not graphed.matches([t])
        assert torch.equal(graphed(t)[0], t * 2) and len(calls) == 1


def test_graph_reason_names_cpu_inputs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu.graph_unsupported_reason([]) == "the net has no inputs to capture"
    assert "[0, 1]" in gpu.graph_unsupported_reason([torch.ones(1), torch.ones(1)])
