"""Input shapes without an export of their own (pycaffe/any_shape.py): an MTCNN image pyramid and
its second stage's changing batch run on one shape-generic export, equal to torch at every
shape; an export that is only right at the shape it was traced at is refused; an engine that
serves fixed shapes only leaves them to torch."""
from __future__ import annotations

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat._pycaffe import fast
from caffe_compat.engine.backends import engine as engines
from caffe_compat.engine.backends.runners import OnnxRuntimeRunner
from test_backends import ENGINES, _prototxt, _weights

pytestmark = pytest.mark.skipif("onnxruntime" not in ENGINES, reason="onnxruntime not installed")

# an MTCNN pyramid of a 40×52 image (factor 0.709 down to P-Net's 12×12), then a second
# image's: more shapes than SHAPES_KEPT
PYRAMID = [(40, 52), (28, 37), (20, 26), (14, 18), (12, 13), (33, 41), (23, 29), (17, 21)]


def _pair(proto: str, weights: str, engine: str):
    return caffe.Net(proto, weights, caffe.TEST), caffe.Net(proto, weights, caffe.TEST,
                                                              engine=engine)


def _same_outputs(ref, net, shape, rng) -> None:
    x = rng.random(shape, dtype=np.float32)
    outs = []
    for target in (ref, net):
        target.blobs["data"].reshape(*shape)
        target.reshape()
        target.blobs["data"].data[...] = x
        outs.append({k: v.copy() for k, v in target.forward().items()})
    for name, want in outs[0].items():
        scale = max(1.0, float(np.abs(want).max()))
        assert outs[1][name].shape == want.shape
        assert float(np.abs(outs[1][name] - want).max()) / scale <= 1e-4, (name, shape)


def _counted(monkeypatch) -> list[bool]:
    """The ``any_shape`` flag of every engine choice pycaffe makes from now on."""
    real, made = fast.choose_engine, []

    def counted(*args, **kwargs):
        made.append(kwargs.get("any_shape", False))
        return real(*args, **kwargs)
    monkeypatch.setattr(fast, "choose_engine", counted)
    return made


def test_a_pyramid_past_the_kept_shapes_runs_one_shape_generic_export(tmp_path, monkeypatch):
    proto = _prototxt(tmp_path, "mtcnn_pnet")
    ref, net = _pair(proto, _weights(tmp_path, proto), "onnxruntime")
    made = _counted(monkeypatch)
    # each new shape's output buffers are sized by the net's shape rules, not by a run
    runs = []
    real_output_shapes = OnnxRuntimeRunner.output_shapes
    monkeypatch.setattr(OnnxRuntimeRunner, "output_shapes",
                        lambda self, ins: runs.append(ins) or real_output_shapes(self, ins))
    rng = np.random.default_rng(0)
    for _ in range(2):
        for h, w in PYRAMID:
            _same_outputs(ref, net, (1, 3, h, w), rng)
            assert net.engine == "onnxruntime"
    # past the load's shape one export, made once (two passes: no shape came back often
    # enough for an export of its own)
    assert made == [True]
    assert "input shapes without an export of their own" in net._fast.choice.reason
    assert runs == []


def test_a_second_stage_batch_that_changes_every_image_stays_on_the_engine(tmp_path):
    """R-Net gets as many 24×24 crops as P-Net kept: a new batch size at most images."""
    proto = _prototxt(tmp_path, "mtcnn_rnet")
    ref, net = _pair(proto, _weights(tmp_path, proto), "onnxruntime")
    rng = np.random.default_rng(1)
    for batch in (1, 7, 3, 12, 5, 30, 2, 7, 1, 19):
        _same_outputs(ref, net, (batch, 3, 24, 24), rng)
        assert net.engine == "onnxruntime"


def test_an_export_right_only_at_its_traced_shape_is_refused(tmp_path, monkeypatch):
    """SPP's bins are pooling windows sized from the input (ceil(H / bins)): traced, those
    sizes are constants, so the shape-generic export is wrong at every other image size.
    The check at nearby shapes finds it; torch runs those shapes."""
    monkeypatch.setattr(fast, "SHAPES_KEPT", 1)
    proto = tmp_path / "spp.prototxt"
    proto.write_text(
        'name: "spp" input: "data" input_shape { dim: 1 dim: 3 dim: 30 dim: 40 }\n'
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
        '  convolution_param { num_output: 4 kernel_size: 3 pad: 1\n'
        '    weight_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "spp" type: "SPP" bottom: "conv" top: "spp"\n'
        '  spp_param { pyramid_height: 2 pool: MAX } }\n')
    ref, net = _pair(str(proto), _weights(tmp_path, str(proto)), "onnxruntime")
    rng = np.random.default_rng(2)
    for shape in ((1, 3, 30, 40), (1, 3, 21, 28), (2, 3, 17, 19)):
        _same_outputs(ref, net, shape, rng)
    assert net.engine == "torch"
    reason = net._fast.choice.reason
    # its outputs there have other shapes than Caffe's shape rules give: the runtime refuses
    # the buffers bound for them (or, given buffers of the traced shapes, the values differ)
    assert ("onnxruntime: outputs differ from fp32 torch" in reason
            or "onnxruntime: onnxruntime failed on a test input" in reason), reason
    assert " at data " in reason


@pytest.mark.skipif("openvino" not in ENGINES, reason="openvino not installed")
def test_openvino_serves_a_pyramid_and_changing_batches_past_the_kept_shapes(tmp_path):
    """One compiled shape-generic model, a new infer request per shape (runners.py)."""
    rng = np.random.default_rng(4)
    proto = _prototxt(tmp_path, "mtcnn_pnet")
    ref, net = _pair(proto, _weights(tmp_path, proto), "openvino")
    for _ in range(2):
        for h, w in PYRAMID:
            _same_outputs(ref, net, (1, 3, h, w), rng)
            assert net.engine == "openvino"
    assert "input shapes without an export of their own" in net._fast.choice.reason
    proto = _prototxt(tmp_path, "mtcnn_onet")
    ref, net = _pair(proto, _weights(tmp_path, proto), "openvino")
    for batch in (1, 7, 3, 12, 5, 30, 2, 7, 1, 19, 64, 3):
        _same_outputs(ref, net, (batch, 3, 48, 48), rng)
        assert net.engine == "openvino"


@pytest.mark.skipif("openvino" not in ENGINES, reason="openvino not installed")
def test_an_engine_for_fixed_shapes_leaves_the_others_to_torch(tmp_path, monkeypatch):
    from caffe_compat.engine.backends.runners import OpenVinoRunner
    monkeypatch.setattr(OpenVinoRunner, "shape_generic", False)
    proto = _prototxt(tmp_path, "mtcnn_pnet")
    ref, net = _pair(proto, _weights(tmp_path, proto), "openvino")
    rng = np.random.default_rng(3)
    for cycle in range(1, fast.PROMOTE_AFTER + 1):
        engines_seen = []
        for h, w in PYRAMID:
            _same_outputs(ref, net, (1, 3, h, w), rng)
            engines_seen.append(net.engine)
            if cycle == 1 and (h, w) == PYRAMID[0]:
                assert "openvino serves fixed input shapes only" in net._fast.choice.reason
    # the shapes the pyramid keeps coming back to get exports of their own, up to the
    # number kept (the load's shape is the first); the others run torch
    kept = fast.SHAPES_KEPT - 1
    assert engines_seen == ["openvino"] * kept + ["torch"] * (len(PYRAMID) - kept)


def test_nearby_shapes_change_the_batch_and_each_image_side_by_one_and_two():
    shapes = {"data": (1, 3, 30, 40), "im_info": (1, 3)}
    assert engines.nearby_shapes(shapes) == [
        {"data": (2, 3, 30, 40), "im_info": (2, 3)},
        {"data": (1, 3, 31, 42), "im_info": (1, 3)},
        {"data": (1, 3, 32, 41), "im_info": (1, 3)}]


def test_kept_shape_plans_are_bounded_by_their_blobs_bytes(tmp_path, monkeypatch):
    """Each kept shape's plan may hold the net's activations at that shape (an OpenVINO
    request does): past PLANS_BYTES of blobs the least recently used are let go."""
    from caffe_compat._pycaffe import any_shape
    proto = _prototxt(tmp_path, "mtcnn_rnet")
    ref, net = _pair(proto, _weights(tmp_path, proto), "onnxruntime")
    rng = np.random.default_rng(5)
    _same_outputs(ref, net, (40, 3, 24, 24), rng)            # the generic export, once
    per_image = any_shape._blob_bytes(net._fast._any.choice.forward, {"data": (1, 3, 24, 24)})
    assert per_image > 0
    monkeypatch.setattr(any_shape, "PLANS_BYTES", 100 * per_image)
    for batch in (30, 31, 32, 33, 34, 30):
        _same_outputs(ref, net, (batch, 3, 24, 24), rng)
        assert net.engine == "onnxruntime"
        kept = net._fast._any._bytes
        assert len(kept) <= 3 and sum(kept.values()) <= 100 * per_image or len(kept) == 1
