"""tools/caffe.py (test, time, device_query, train), device selection, signals, progress bar."""
from __future__ import annotations

import io
import re
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.commands import device as devices
from caffe_compat.commands.progress import TrainProgress
from caffe_compat.commands.signals import SignalHandler
from caffe_compat.commands.time_cmd import benchmark
from caffe_compat.engine.mode import DeviceError
from caffe_compat.engine.net.module import build_net
from caffe_compat.pycaffe import read_net_prototxt
from caffe_compat.formats import glog
from test_cli_train import DUMMY_NET, ROOT, load_tool, write_solver

GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ \S+:\d+\] (.*)$")


def caffe_main(argv):
    return load_tool("caffe").main(argv)


def messages(err: str) -> list[str]:
    return [m.group(1) for m in map(GLOG_LINE.match, err.splitlines()) if m]


@pytest.fixture
def dummy_model(tmp_path):
    """DUMMY_NET and a caffemodel of its TEST-phase weights (fixed by the seed)."""
    (tmp_path / "net.prototxt").write_text(DUMMY_NET)
    caffe.set_random_seed(5)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "w.caffemodel"))
    return tmp_path


# ------------------------------------------------------------------------ caffe test
def test_caffe_test_prints_batches_and_means(dummy_model, capsys):
    net, w = dummy_model / "net.prototxt", dummy_model / "w.caffemodel"
    assert caffe_main(["test", "--model", str(net), "--weights", str(w),
                       "--iterations", "3"]) == 0
    msgs = messages(capsys.readouterr().err)
    assert "Running for 3 iterations." in msgs
    batches = [m for m in msgs if m.startswith("Batch ")]
    assert [m.split(",")[0] for m in batches] == ["Batch 0", "Batch 0", "Batch 1", "Batch 1",
                                                 "Batch 2", "Batch 2"]
    assert batches[0].startswith("Batch 0, accuracy = ") and \
        batches[1].startswith("Batch 0, loss = ")
    # The reference values: one forward of the same net and weights.
    ref = caffe.Net(str(net), str(w), caffe.TEST).forward()
    loss = float(ref["loss"])
    assert f"Loss: {glog.num(np.float32(loss))}" in msgs
    assert f"accuracy = {glog.num(float(ref['accuracy']))}" in msgs
    assert f"loss = {glog.num(loss)} (* 1 = {glog.num(loss)} loss)" in msgs


def test_caffe_test_needs_weights_and_model(dummy_model, capsys):
    assert caffe_main(["test", "--model", str(dummy_model / "net.prototxt")]) == 1
    assert "caffe.py test: error: Need model weights to score" in capsys.readouterr().err
    assert caffe_main(["test", "--weights", "w.caffemodel"]) == 1
    assert "Need a model definition" in capsys.readouterr().err


def test_caffe_test_shape_mismatch_is_one_line(dummy_model, capsys):
    other = DUMMY_NET.replace("num_output: 3", "num_output: 5")
    (dummy_model / "other.prototxt").write_text(other)
    assert caffe_main(["test", "-model", str(dummy_model / "other.prototxt"), "-weights",
                       str(dummy_model / "w.caffemodel"), "-iterations", "1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [l for l in err if "error:" in l] == [l for l in err if "layer 'ip1'" in l]
    assert "Traceback" not in "\n".join(err)


# ------------------------------------------------------------------------ caffe time
def test_caffe_time_table(dummy_model, capsys):
    assert caffe_main(["time", "--model", str(dummy_model / "net.prototxt"),
                       "--iterations", "2"]) == 0
    msgs = messages(capsys.readouterr().err)
    assert "Testing for 2 iterations." in msgs and "*** Benchmark ends ***" in msgs
    assert sum(m.startswith("Iteration: ") and "forward-backward time" in m for m in msgs) == 2
    for name, kind in (("data", "DummyData"), ("conv1", "Convolution"), ("relu1", "ReLU"),
                       ("ip1", "InnerProduct"), ("loss", "SoftmaxWithLoss")):
        for way in ("forward", "backward"):
            assert any(re.fullmatch(rf" *{name} \({kind}\) *\t{way}: [\d.e+-]+ ms\.", m)
                       for m in msgs), (name, way)
    assert not any("accuracy (Accuracy)" in m for m in msgs)       # TRAIN phase by default
    for what in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward",
                 "Total Time"):
        assert any(re.fullmatch(rf"{what}: [\d.e+-]+ ms\.", m) for m in msgs), what


def test_layerwise_backward_matches_autograd(dummy_model):
    """time's layer-by-layer backward produces the same param diffs as one autograd pass."""
    net = DUMMY_NET.replace('type: "constant" value: 0.5', 'type: "constant" value: -0.3')
    module = build_net(read_net_prototxt_text(net), caffe.TRAIN)
    result = benchmark(module, 1, devices.DeviceChoice())
    assert [lt.name for lt in result.layers] == module.layer_names
    layerwise = [p.grad.clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    loss, _ = module.forward_loss()
    loss.backward()
    for a, p in zip(layerwise, module.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert result.initial_loss == pytest.approx(float(loss.detach()))


def test_time_feeds_loss_layers_float32_under_bf16(monkeypatch):
    """caffe time --precision bf16 runs each layer as training does: the loss layer gets
    float32 bottoms (a bfloat16 softmax keeps 3 significant digits) although the
    InnerProduct below it computes in bf16."""
    from caffe_compat.engine.layers.loss import SoftmaxWithLoss
    seen = []
    original = SoftmaxWithLoss.forward

    def recording(self, *bottoms):
        seen.append(bottoms[0].dtype)
        return original(self, *bottoms)
    monkeypatch.setattr(SoftmaxWithLoss, "forward", recording)
    net = DUMMY_NET.replace('type: "constant" value: 0.5', 'type: "gaussian" std: 1')
    module = build_net(read_net_prototxt_text(net), caffe.TRAIN)
    result = benchmark(module, 2, devices.DeviceChoice(precision="bf16"))
    assert seen and set(seen) == {torch.float32}, seen
    with devices.autocast(devices.DeviceChoice(precision="bf16")):
        blobs = module.run({}, keep_all=True)
    assert blobs["ip1"].dtype == torch.bfloat16       # what a plain call would have fed it
    assert result.initial_loss > 0


def read_net_prototxt_text(text: str):
    from caffe_compat.formats.blob_io import read_text_proto
    from caffe_compat.proto import caffe_pb2
    return read_text_proto(text, caffe_pb2.NetParameter)


@pytest.mark.parametrize("model", sorted(p.parent.name for p in
                                         (ROOT / "models").glob("*_64/deploy.prototxt")))
def test_time_runs_on_model_deploy_nets(model):
    """Input-layer nets run on zeros (as Caffe's time does); backward is 0 without a loss."""
    module = build_net(read_net_prototxt(str(ROOT / "models" / model / "deploy.prototxt")),
                       caffe.TRAIN)
    result = benchmark(module, 1, devices.DeviceChoice(), forward_only=True)
    assert len(result.layers) == len(module.layer_names) and result.forward_ms > 0


# ------------------------------------------------------------------------ other commands
def test_device_query(capsys):
    rc = caffe_main(["device_query"])
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert rc == 0 and any(m.startswith("Name:") for m in messages(err))
    else:
        assert rc == 1
        assert err.strip().startswith("caffe.py device_query: error: no CUDA device: ")


def test_unknown_and_missing_command(capsys):
    assert caffe_main(["brew"]) == 1
    err = capsys.readouterr().err
    assert "unknown command 'brew' (known: train, test, time, " in err
    assert all(name in err for name in ("dataset", "fit", "score", "bundle", "dashboard",
                                        "device_query"))
    assert caffe_main([]) == 1
    assert caffe_main(["--help"]) == 0


def test_caffe_train_delegates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    solver = write_solver(tmp_path, max_iter=3, snapshot=0, test_interval=3)
    assert caffe_main(["train", "-solver", str(solver), "--no_plot"]) == 0
    assert "Snapshot:     snap/run_iter_3.caffemodel" in capsys.readouterr().out


# ------------------------------------------------------------------------ devices
def test_parse_gpu_flag():
    assert devices.parse_gpu_flag("0") == [0]
    assert devices.parse_gpu_flag("0,1") == [0, 1]
    assert devices.parse_gpu_flag("all") == "all"
    for bad in ("x", "-1", "0,0", ""):
        with pytest.raises(DeviceError, match="--gpu"):
            devices.parse_gpu_flag(bad)


def test_select_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.select(None).kind == "cpu"
    with pytest.raises(DeviceError, match=r"--gpu 0 asks for CUDA, but .*--allow-cpu"):
        devices.select("0")
    assert devices.select("all", allow_cpu=True).kind == "cpu"
    param = caffe.proto.caffe_pb2.SolverParameter(solver_mode=1, device_id=2)   # GPU
    with pytest.raises(DeviceError, match=r"solver_mode: GPU \(device_id 2\)"):
        devices.select(None, param)
    assert devices.select(None, caffe.proto.caffe_pb2.SolverParameter()).kind == "cpu"


def test_select_with_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.select("all").ids == [0, 1]
    assert devices.select("1", precision="bf16").device == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="no CUDA device 3 .2 present"):
        devices.select("0,3")
    with pytest.raises(DeviceError, match="known precisions"):
        devices.select(None, precision="int8")


def test_autocast_context():
    assert devices.autocast(devices.DeviceChoice()).__class__.__name__ == "nullcontext"
    with devices.autocast(devices.DeviceChoice(precision="bf16")):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16


# ------------------------------------------------------------------------ signals
def test_signal_handler_actions():
    with pytest.raises(ValueError, match='Invalid signal effect "kill"'):
        SignalHandler("kill")
    h = SignalHandler("stop", "snapshot")
    assert h.action() == "none"
    h._on_sighup(signal.SIGHUP if hasattr(signal, "SIGHUP") else 1, None)
    h._on_sigint(signal.SIGINT, None)
    assert h.action() == "stop"          # SIGINT's effect first, as Caffe
    assert h.action() == "snapshot"
    assert h.action() == "none"
    with pytest.raises(KeyboardInterrupt):
        h._on_sigint(signal.SIGINT, None)   # a second Ctrl-C while stopping


# ------------------------------------------------------------------------ progress bar
def test_progress_bar_and_log_lines_do_not_interleave(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "snap").mkdir()
    solver = caffe.get_solver(str(write_solver(tmp_path, max_iter=6, test_interval=3,
                                               display=1, snapshot=0)))
    assert solver.images_per_iter == 4
    out = io.StringIO()
    with TrainProgress(6, enabled=True, file=out).attach(solver) as bar:
        solver.solve()
        assert "loss=" in str(bar.bar) and "img/s=" in str(bar.bar) and "acc=" in str(bar.bar)
    text = out.getvalue()
    # every glog line starts a fresh line: after a newline, or after the bar's erase "\r"
    for line in re.findall(r"[^\n]*Iteration \d+, lr = [^\n]*", text):
        assert GLOG_LINE.match(line.split("\r")[-1]), repr(line)
    assert "6/6" in text
    assert glog.echo() is None                     # close() restored the plain stderr copy


def test_progress_bar_off_when_not_a_terminal():
    """No bar: progress goes to the log instead, every display interval (5% without one)."""
    subscribed = []
    solver = SimpleNamespace(iter=0, param=SimpleNamespace(display=0),
                             subscribe=lambda *args: subscribed.append(args))
    bar = TrainProgress(100, file=io.StringIO())
    assert bar.enabled is False and bar.attach(solver) is bar
    assert bar.bar is None and bar.every == 5 and subscribed
