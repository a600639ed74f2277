"""``precision="auto"`` offers OpenVINO computing in bf16 (``openvino-bf16``) beside torch's
bf16 autocast, on CPUs with native bf16, where OpenVINO is a candidate: held to
``BF16_TOLERANCE`` of fp32 torch like torch-bf16, and re-exported (as ``openvino``) when the
weights change."""
from __future__ import annotations

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.engine import precision
from caffe_compat.engine.backends import engine as engines

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")
from test_backends import _forward, _prototxt, _weights  # noqa: E402


def _close_to(got: dict, want: dict, tolerance: float) -> None:
    for name, value in want.items():
        scale = max(1.0, float(np.abs(value).max()))
        assert np.abs(got[name] - value).max() <= tolerance * scale, name


def _native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(precision, "candidates",
                        lambda device, flags=None: ["bf16"] if native else [])


@pytest.fixture
def onet(tmp_path):
    proto = _prototxt(tmp_path, "mtcnn_onet")
    return proto, _weights(tmp_path, proto)


def test_openvino_bf16_is_measured_and_held_to_the_bf16_tolerance(onet, monkeypatch):
    proto, weights = onet
    ref = caffe.Net(proto, weights, caffe.TEST)
    x = np.random.default_rng(3).random(ref.blobs["data"].shape, dtype=np.float32)
    want = _forward(ref, x)
    _native(monkeypatch, True)
    monkeypatch.setattr(engines, "median_times", lambda steps: {
        n: 0.0 if n == "openvino-bf16" else 1.0 for n in steps})    # measured fastest
    net = caffe.Net(proto, weights, caffe.TEST, engine="auto", precision="auto")
    assert net.engine == "openvino-bf16"
    reason = net._fast.choice.reason
    assert "torch-bf16" in reason and "onnxruntime" in reason     # every candidate built
    if any(f in precision.cpu_flags() for f in precision.NATIVE_BF16_CPU_FLAGS):
        # what the compiled model reports using (a CPU without bf16 would report f32)
        assert "INFERENCE_PRECISION_HINT bf16" in reason
    assert net._fast.choice.tolerance == engines.BF16_TOLERANCE
    got = _forward(net, x)
    _close_to(got, want, engines.BF16_TOLERANCE)
    assert net.engine == "openvino-bf16" and net._fast.choice.verified


def test_openvino_bf16_only_with_native_bf16_and_openvino_asked_for(onet, monkeypatch):
    proto, weights = onet
    _native(monkeypatch, True)
    ort = caffe.Net(proto, weights, caffe.TEST, engine="onnxruntime", precision="auto")
    assert "openvino" not in ort._fast.choice.reason           # only the engine asked for
    fp32 = caffe.Net(proto, weights, caffe.TEST, engine="auto")
    assert "bf16" not in fp32._fast.choice.reason             # precision fp32: no bf16 at all
    _native(monkeypatch, False)
    plain = caffe.Net(proto, weights, caffe.TEST, engine="openvino", precision="auto")
    assert "openvino-bf16" not in plain._fast.choice.reason
    assert "no native bf16" in plain._fast.choice.reason


def test_weight_edit_reexports_openvino_bf16_as_openvino(onet, monkeypatch):
    """A weight changed after the export: the net is exported again, chosen among the
    engines ``openvino`` stands for (the bf16 name is not a requestable engine), and the
    outputs follow the new weights."""
    proto, weights = onet
    _native(monkeypatch, True)
    monkeypatch.setattr(engines, "median_times", lambda steps: {
        n: 0.0 if n == "openvino-bf16" else 1.0 for n in steps})
    net = caffe.Net(proto, weights, caffe.TEST, engine="auto", precision="auto")
    ref = caffe.Net(proto, weights, caffe.TEST)
    x = np.random.default_rng(4).random(ref.blobs["data"].shape, dtype=np.float32)
    _forward(net, x)
    for n in (net, ref):
        n.params["conv1"][0].data[...] *= 0.5
    got, want = _forward(net, x), _forward(ref, x)
    assert net.engine == "openvino-bf16"
    _close_to(got, want, engines.BF16_TOLERANCE)
    assert engines.requested_as("openvino-bf16") == "openvino"
    assert engines.requested_as("onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match="engine 'openvino-bf16'"):
        engines.requested_engine("openvino-bf16")             # chosen, never asked for
