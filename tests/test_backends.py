"""Inference engines (engine/backends): every engine's outputs equal torch's on the small
deployed-net families, SSD split around its DetectionOutput, and each fallback to torch."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.backends import engine as engines
from caffe_compat.engine.backends.runners import RUNNERS, BackendUnavailable
from caffe_compat.engine.backends.split import split_plan

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
NETS = Path(__file__).resolve().parents[1] / "benchmarks" / "nets"
sys.path.insert(0, str(NETS))
from generate import NETS as GENERATORS  # noqa: E402

SMALL_INPUT = {"ultraface_slim": (60, 80), "ssd_face": (60, 80), "mtcnn_pnet": (24, 32)}


def _installed(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


ENGINES = [e for e in ("onnxruntime", "openvino") if _installed(e)]


def _with_reference(proto: str, engine: str):
    """(a TEST net on ``engine``, a torch TEST net sharing its weights)."""
    net = caffe.Net(proto, caffe.TEST, engine=engine)
    ref = caffe.Net(proto, caffe.TEST)
    ref.share_with(net)
    return net, ref


def _prototxt(tmp_path, name: str) -> str:
    text = GENERATORS[name]().text()
    if name in SMALL_INPUT:
        h, w = SMALL_INPUT[name]
        text = re.sub(r"dim: 3 dim: \d+ dim: \d+", f"dim: 3 dim: {h} dim: {w}", text, count=1)
    path = tmp_path / f"{name}.prototxt"
    path.write_text(text)
    return str(path)


def _weights(tmp_path, proto: str) -> str:
    """Trained-looking weights: BatchNorm statistics and PReLU slopes away from the fillers'."""
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.default_rng(0)
    for name, blobs in net.params.items():
        layer = net.layer_dict[name]
        if layer.type == "BatchNorm":
            blobs[0].data[...] = rng.normal(0, 0.1, blobs[0].data.shape)
            blobs[1].data[...] = rng.random(blobs[1].data.shape) + 0.5
            blobs[2].data[...] = 1
        elif layer.type == "PReLU":
            blobs[0].data[...] = rng.uniform(0, 0.5, blobs[0].data.shape)
    path = tmp_path / "w.caffemodel"
    net.save(str(path))
    return str(path)


def _forward(net, x):
    """The outputs; a detection list in a canonical row order (two boxes of near-equal
    score swap places under a 1e-7 difference, which the thread count alone can make)."""
    out = {k: v.copy() for k, v in net.forward(data=x).items()}
    if "detection_out" in out:
        out["detection_out"] = canonical_detections(out["detection_out"])
    return out


def canonical_detections(detections: np.ndarray) -> np.ndarray:
    rows = detections.reshape(-1, 7)
    return rows[np.lexsort(np.round(rows, 3).T[::-1])].reshape(detections.shape)


@pytest.mark.parametrize("family", ["lenet", "mtcnn_onet", "mtcnn_pnet", "ultraface_slim",
                                    "ssd_face"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_outputs_equal_torch(tmp_path, family, engine):
    proto = _prototxt(tmp_path, family)
    weights = _weights(tmp_path, proto)
    ref = caffe.Net(proto, weights, caffe.TEST)
    net = caffe.Net(proto, weights, caffe.TEST, engine=engine)
    assert net.engine == engine
    x = np.random.default_rng(1).random(ref.blobs["data"].shape, dtype=np.float32)
    want, got = _forward(ref, x), _forward(net, x)
    assert net.engine == engine                  # the first-call check kept it
    for name in want:
        scale = max(1.0, float(np.abs(want[name]).max()))
        if name == "detection_out":
            assert_same_rows(got[name], want[name], scale * engines.TOLERANCE)
            continue
        assert np.abs(got[name] - want[name]).max() / scale <= engines.TOLERANCE, name


def assert_same_rows(got: np.ndarray, want: np.ndarray, tolerance: float) -> None:
    """Each detection row equals a different reference row within ``tolerance``: row order
    is no part of the answer when two scores tie to 1e-7 (a canonical sort on rounded
    values still swaps such rows when one lands on a rounding boundary)."""
    g, w = got.reshape(-1, 7), want.reshape(-1, 7)
    assert g.shape == w.shape
    distance = np.abs(g[:, None, :] - w[None, :, :]).max(-1)
    nearest = distance.argmin(1)
    assert len(set(nearest.tolist())) == len(g), "two rows match the same reference row"
    assert distance[np.arange(len(g)), nearest].max() <= tolerance


def test_ssd_runs_split_around_detection_output(tmp_path):
    proto = _prototxt(tmp_path, "ssd_face")
    weights = _weights(tmp_path, proto)
    net = caffe.Net(proto, weights, caffe.TEST)
    split = split_plan(net.module)
    assert [op.fn.type for op in split.suffix] == ["DetectionOutput"]
    assert set(split.prefix_outputs) == {"mbox_loc", "mbox_conf_flatten", "mbox_priorbox"}
    chosen = caffe.Net(proto, weights, caffe.TEST, engine=ENGINES[0])
    assert chosen.engine == ENGINES[0]
    x = np.random.default_rng(2).random(net.blobs["data"].shape, dtype=np.float32)
    want, got = _forward(net, x)["detection_out"], _forward(chosen, x)["detection_out"]
    assert want.shape == got.shape and want.shape[2] > 1           # detections were kept
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert chosen.engine == ENGINES[0]               # not a fallback after the first call


def test_auto_keeps_a_measured_engine_and_blobs_read_as_caffe(tmp_path):
    proto = _prototxt(tmp_path, "mtcnn_rnet")
    ref = caffe.Net(proto, caffe.TEST)
    net = caffe.Net(proto, caffe.TEST, engine="auto")
    ref.share_with(net)
    assert net.engine in ("torch", *ENGINES)
    assert "fastest median" in net._fast.choice.reason
    x = np.random.default_rng(3).random(ref.blobs["data"].shape, dtype=np.float32)
    _forward(ref, x), _forward(net, x)
    # an intermediate blob, and backward, come from the torch path as in Caffe
    np.testing.assert_allclose(net.blobs["pool1"].data, ref.blobs["pool1"].data, rtol=1e-6)


def test_changed_weights_are_seen(tmp_path):
    proto = _prototxt(tmp_path, "lenet")
    net = caffe.Net(proto, caffe.TEST, engine=ENGINES[0])
    ref = caffe.Net(proto, caffe.TEST)
    x = np.random.default_rng(4).random(ref.blobs["data"].shape, dtype=np.float32)
    for scale in (2.0, -1.0, 0.5):                    # re-exported once, then torch
        for target in (net, ref):
            target.params["ip2"][0].data[...] = scale * np.ones_like(target.params["ip2"][0].data)
        np.testing.assert_allclose(_forward(net, x)["prob"], _forward(ref, x)["prob"],
                                   rtol=1e-5, atol=1e-6)
    assert net.engine == "torch"


def test_reading_the_weights_keeps_the_engine(tmp_path):
    """numpy hand-outs that only read (filters shown between forwards) are not weight
    changes: the engine stays, with no export; a write after them is one change."""
    proto = _prototxt(tmp_path, "lenet")
    net = caffe.Net(proto, caffe.TEST, engine=ENGINES[0])
    ref = caffe.Net(proto, caffe.TEST)
    ref.share_with(net)
    x = np.random.default_rng(5).random(ref.blobs["data"].shape, dtype=np.float32)
    plan = net._fast.choice.forward
    for _ in range(3):
        assert np.isfinite(net.params["conv1"][0].data).all()           # a read
        _forward(net, x)
    assert net.engine == ENGINES[0] and net._fast.choice.forward is plan  # not re-exported
    want = ref.params["ip2"][0].data * 0.5                                # shared: a write
    net.params["ip2"][0].data[...] = want
    np.testing.assert_allclose(_forward(net, x)["prob"], _forward(ref, x)["prob"],
                               rtol=1e-5, atol=1e-6)
    assert net.engine == ENGINES[0] and net._fast.choice.forward is not plan


def test_fallbacks(tmp_path, monkeypatch):
    proto = _prototxt(tmp_path, "lenet")
    with pytest.raises(ValueError, match="expected one of"):
        caffe.Net(proto, caffe.TEST, engine="tensorrt")
    train = caffe.Net(proto, caffe.TRAIN, engine="onnxruntime")      # no fast path in TRAIN
    assert train.engine == "torch"

    def missing(*args, **kwargs):
        raise BackendUnavailable("onnxruntime is not installed")
    monkeypatch.setitem(RUNNERS, "onnxruntime", missing)
    net = caffe.Net(proto, caffe.TEST, engine="onnxruntime")
    assert net.engine == "torch" and "not installed" in net._fast.choice.reason


def test_a_runtime_failing_on_its_test_input_falls_back(tmp_path, monkeypatch):
    """A graph the runtime loads but cannot run (an output shape its kernels disagree on,
    an op that fails at run time) leaves the net on torch with the reason, not a
    traceback out of ``caffe.Net``."""
    proto = _prototxt(tmp_path, "lenet")
    loads = RUNNERS[ENGINES[0]]

    class FailsToRun(loads):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.run = self._fail

        @staticmethod
        def _fail():
            raise RuntimeError("RUNTIME_EXCEPTION: shape mismatch\n  (details)")
    monkeypatch.setitem(RUNNERS, ENGINES[0], FailsToRun)
    net = caffe.Net(proto, caffe.TEST, engine=ENGINES[0])
    assert net.engine == "torch"
    assert "failed on a test input (RUNTIME_EXCEPTION: shape mismatch)" in \
        net._fast.choice.reason
    ref = caffe.Net(proto, caffe.TEST)
    ref.share_with(net)
    x = np.random.default_rng(8).random(ref.blobs["data"].shape, dtype=np.float32)
    np.testing.assert_array_equal(_forward(net, x)["prob"], _forward(ref, x)["prob"])


UNUSED_INPUT = """
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 5 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_an_input_no_layer_reads_does_not_keep_the_engine_off(tmp_path, engine):
    """A deploy net that keeps an Input top nothing reads (a leftover "label"): the export
    has no such input, and binding it failed the load. It is a net output, as in Caffe."""
    proto = tmp_path / "unused.prototxt"
    proto.write_text(UNUSED_INPUT)
    net, ref = _with_reference(str(proto), engine)
    assert net.engine == engine, net._fast.choice.reason
    feed = {"data": np.random.default_rng(9).random((2, 5), dtype=np.float32),
            "label": np.array([1.0, 2.0], np.float32)}
    got, want = net.forward(**feed), ref.forward(**feed)
    np.testing.assert_array_equal(got["label"], feed["label"])
    np.testing.assert_allclose(got["prob"], want["prob"], rtol=1e-5, atol=1e-6)


FILTERED = """name: "filtered"
layer { name: "in" type: "Input" top: "data" top: "sel"
  input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "keep" type: "Filter" bottom: "ip" bottom: "sel" top: "kept" }
layer { name: "relu" type: "ReLU" bottom: "kept" top: "out" }
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_filter_runs_after_the_engine_for_every_selector(tmp_path, engine):
    """Filter's output rows are the non-zero selectors, known only at run time: exported,
    the runtime failed on the first selector that kept fewer rows than the first call."""
    proto = tmp_path / "filtered.prototxt"
    proto.write_text(FILTERED)
    net, ref = _with_reference(str(proto), engine)
    assert net.engine == engine, net._fast.choice.reason
    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    for sel in ([1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]):
        feed = {"data": data, "sel": np.array(sel, np.float32)}
        got, want = net.forward(**feed)["out"], ref.forward(**feed)["out"]
        assert got.shape == (sum(sel), 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_difference_sees_nan_on_one_side_only():
    want = {"p": torch.tensor([0.5, 2.0, float("nan"), float("inf")])}
    assert engines.difference({"p": want["p"].clone()}, want) == 0.0
    assert engines.difference({"p": torch.tensor([0.5, 2.5, float("nan"), float("inf")])},
                              want) == pytest.approx(0.25)
    for bad in ([float("nan"), 2.0, float("nan"), float("inf")],
                [0.5, 2.0, 1.0, float("inf")], [0.5, 2.0, float("nan"), 1.0]):
        assert engines.difference({"p": torch.tensor(bad)}, want) == float("inf"), bad


def test_a_nan_first_input_leaves_the_engine_to_the_next_call(tmp_path):
    """A corrupt first image (NaN) made every output differ from torch's by NaN, and the
    engine was dropped for good; that call now gets torch's values and the next decides."""
    proto = _prototxt(tmp_path, "lenet")
    net, ref = _with_reference(proto, ENGINES[0])
    bad = np.full(net.blobs["data"].data.shape, np.nan, np.float32)
    got, want = net.forward(data=bad), ref.forward(data=bad)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert net.engine == ENGINES[0] and not net._fast.choice.verified
    good = np.random.default_rng(3).random(bad.shape, dtype=np.float32)
    got, want = net.forward(data=good), ref.forward(data=good)
    assert net.engine == ENGINES[0] and net._fast.choice.verified
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_first_call_difference_falls_back(tmp_path):
    proto = _prototxt(tmp_path, "lenet")
    net, ref = _with_reference(proto, ENGINES[0])
    call = net._fast.choice.forward.call
    honest = call._run

    def broken():                                    # a runtime that adds 1 to everything
        honest()
        for out in call.outputs:
            out += 1
    call._run = broken
    x = np.random.default_rng(5).random(ref.blobs["data"].shape, dtype=np.float32)
    np.testing.assert_allclose(_forward(net, x)["prob"], _forward(ref, x)["prob"], rtol=1e-6)
    assert net.engine == "torch"


def test_environment_names_the_engine(monkeypatch):
    monkeypatch.setenv(engines.ENGINE_ENV, "OpenVINO")
    assert engines.requested_engine(None) == "openvino"
    assert engines.requested_engine("torch") == "torch"
    monkeypatch.setenv(engines.ENGINE_ENV, "onnx")          # set once, read by every Net
    with pytest.raises(ValueError, match=r"\$CAFFE_COMPAT_ENGINE: engine 'onnx'"):
        engines.requested_engine(None)
    assert engines.difference({"a": torch.ones(2)}, {"a": torch.ones(3)}) == float("inf")


def test_precision_auto_takes_bf16_only_when_close_and_native(tmp_path, monkeypatch):
    from caffe_compat.engine import precision
    proto = _prototxt(tmp_path, "mtcnn_onet")
    weights = _weights(tmp_path, proto)
    ref = caffe.Net(proto, weights, caffe.TEST)
    x = np.random.default_rng(6).random(ref.blobs["data"].shape, dtype=np.float32)
    want = _forward(ref, x)
    monkeypatch.setattr(precision, "candidates", lambda device, flags=None: ["bf16"])
    net = caffe.Net(proto, weights, caffe.TEST, precision="auto")
    assert net.engine in ("torch", "torch-bf16")
    assert "torch-bf16" in net._fast.choice.reason          # it was measured
    got = _forward(net, x)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= engines.BF16_TOLERANCE * max(
            1.0, float(np.abs(want[name]).max()))
    monkeypatch.setattr(engines, "BF16_TOLERANCE", 0.0)      # bf16 can never be that close
    strict = caffe.Net(proto, weights, caffe.TEST, precision="auto")
    assert strict.engine == "torch" and "differ" in strict._fast.choice.reason
    monkeypatch.setattr(precision, "candidates", lambda device, flags=None: [])
    plain = caffe.Net(proto, weights, caffe.TEST, precision="auto")
    assert plain.engine == "torch" and "no native bf16" in plain._fast.choice.reason
    with pytest.raises(ValueError, match="precision"):
        caffe.Net(proto, weights, caffe.TEST, precision="fp16")


def test_bf16_is_checked_on_the_first_real_call_too(tmp_path, monkeypatch):
    """Like an engine, bf16 is held to its tolerance on the first real call (real inputs
    reach other magnitudes than the random ones it was checked on at load): outside it,
    that call's outputs and every later one are fp32 torch's."""
    from caffe_compat.engine import precision
    proto = _prototxt(tmp_path, "mtcnn_onet")
    weights = _weights(tmp_path, proto)
    ref = caffe.Net(proto, weights, caffe.TEST)
    monkeypatch.setattr(precision, "candidates", lambda device, flags=None: ["bf16"])
    monkeypatch.setattr(engines, "median_times", lambda steps: {
        n: 0.0 if n == "torch-bf16" else 1.0 for n in steps})     # bf16 measured fastest
    net = caffe.Net(proto, weights, caffe.TEST, precision="auto")
    assert net.engine == "torch-bf16" and not net._fast.choice.verified
    net._fast.choice.tolerance = 0.0            # these inputs: further from fp32 than allowed
    x = np.random.default_rng(7).random(ref.blobs["data"].shape, dtype=np.float32)
    want = _forward(ref, x)
    for _ in range(2):
        got = _forward(net, x)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert net.engine == "torch"


def test_cli_test_through_an_engine_equals_torch(tmp_path, capsys):
    from caffe_compat.commands import caffe_main
    proto = _prototxt(tmp_path, "lenet")
    weights = _weights(tmp_path, proto)
    lines = {}
    for engine in ("torch", ENGINES[0]):
        assert caffe_main.main(["test", "--model", proto, "--weights", weights,
                                "--iterations", "1", "--engine", engine, "--threads", "1"]) == 0
        err = capsys.readouterr().err
        lines[engine] = [l.split("] ", 1)[1] for l in err.splitlines() if "prob = " in l]
        assert engine == "torch" or f"Inference engine: {engine}" in err
    values = {e: np.array([float(l.split("= ")[1]) for l in v]) for e, v in lines.items()}
    assert len(values["torch"]) == 20
    np.testing.assert_allclose(values[ENGINES[0]], values["torch"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_leave_torch_subnormals_alone(tmp_path, engine):
    """A runtime must not switch flush-to-zero on for the calling thread (onnxruntime's
    set_denormal_as_zero does, for the rest of the process)."""
    proto = _prototxt(tmp_path, "lenet")
    net = caffe.Net(proto, caffe.TEST, engine=engine)
    net.forward(data=np.ones(net.blobs["data"].shape, np.float32))
    tiny = torch.tensor([1e-40]) * torch.tensor([1.0])
    assert float(tiny) > 0


@pytest.mark.skipif("openvino" not in ENGINES, reason="openvino is not installed")
def test_openvino_nets_freed_in_any_order_leave_signals_working(tmp_path):
    """Each OpenVINO compiled model swaps the thread's alternate signal stack and puts back
    the one it found when freed; freed first-in first-out, the thread was left on a freed
    stack and the next SIGINT killed the process (SIGSEGV)."""
    import gc
    import os
    import signal
    proto = _prototxt(tmp_path, "lenet")
    first = caffe.Net(proto, caffe.TEST, engine="openvino")
    second = caffe.Net(proto, caffe.TEST, engine="openvino")
    del first
    gc.collect()
    del second
    gc.collect()
    got = []
    previous = signal.signal(signal.SIGINT, lambda *args: got.append(args[0]))
    try:
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert got == [signal.SIGINT]
