"""pycaffe's repeat of the last engine forward (_pycaffe/steady.py) and the parameter list
it compares by identity (ParameterWatch): every change a full forward would see still
reaches the outputs, and nothing that is no change sends the net back to its export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers.base import BlobList
from caffe_compat.engine.net.inference_cache import ParameterWatch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

LENET = """name: "steady"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""


@pytest.fixture
def nets(tmp_path):
    """(a net on onnxruntime with a steady call recorded, a torch net sharing its weights)."""
    proto = tmp_path / "steady.prototxt"
    proto.write_text(LENET)
    net = caffe.Net(str(proto), caffe.TEST, engine="onnxruntime")
    ref = caffe.Net(str(proto), caffe.TEST)
    ref.share_with(net)
    assert net.engine == "onnxruntime"
    for seed in (0, 1):                          # the first call is checked; then recorded
        net.forward(data=_image(seed))
    assert net._fast._steady is not None
    return net, ref


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((2, 1, 12, 12), dtype=np.float32)


def _same(net, ref, seed: int) -> None:
    got = net.forward(data=_image(seed))["prob"].copy()
    want = ref.forward(data=_image(seed))["prob"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_repeated_forwards_are_exact_and_intermediate_blobs_read_as_caffe(nets):
    net, ref = nets
    steady = net._fast._steady
    for seed in (2, 3, 4):
        _same(net, ref, seed)
        assert net._fast._steady is steady                       # the same call, repeated
    # the blobs the engine skipped come from the last forward's input, as Caffe's would
    np.testing.assert_allclose(net.blobs["pool1"].data, ref.blobs["pool1"].data, rtol=1e-6)
    held = net.blobs["data"].data
    held[...] = _image(5)           # written after the forward: no blob changes until the next
    np.testing.assert_allclose(net.blobs["conv1"].data, ref.blobs["conv1"].data, rtol=1e-6)


def test_a_torch_write_to_a_weight_is_seen(nets):
    net, ref = nets
    with torch.no_grad():
        net.module.layers[1].blobs[0].mul_(-0.5)            # conv1's weights, in place
    _same(net, ref, 6)


def test_a_numpy_write_through_a_held_view_is_seen(nets):
    net, ref = nets
    weights = net.params["ip1"][0].data                   # a hand-out: the full path runs
    _same(net, ref, 7)
    _same(net, ref, 8)
    weights *= 3.0                                        # numpy: no torch version moves
    _same(net, ref, 9)


def test_a_replaced_weight_is_seen(nets):
    net, ref = nets
    layer = net.module.layers[1]
    layer.blobs[1] = torch.nn.Parameter(torch.full_like(layer.blobs[1], -2.0))
    ref.share_with(net)
    _same(net, ref, 10)


def test_a_new_input_shape_is_seen(nets):
    net, ref = nets
    for target in (net, ref):
        target.blobs["data"].reshape(3, 1, 12, 12)
        target.reshape()
    x = np.random.default_rng(11).random((3, 1, 12, 12), dtype=np.float32)
    got = net.forward(data=x)["prob"].copy()
    np.testing.assert_allclose(got, ref.forward(data=x)["prob"], rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 5)


def test_another_net_built_keeps_the_export(nets, tmp_path):
    net, ref = nets
    plan = net._fast.choice.forward
    caffe.Net(str(tmp_path / "steady.prototxt"), caffe.TEST)     # its blobs: BlobList changes
    _same(net, ref, 12)
    assert net._fast.choice.forward is plan


def test_parameter_watch_lists_again_only_after_a_change(tmp_path):
    proto = tmp_path / "steady.prototxt"
    proto.write_text(LENET)
    module = caffe.Net(str(proto), caffe.TEST).module
    watch = ParameterWatch(module)
    first = watch()
    assert watch() is first and len(first) == 4
    before = BlobList.changes
    caffe.Net(str(proto), caffe.TEST)                       # other nets' lists change
    assert BlobList.changes > before and watch() is first
    replacement = torch.nn.Parameter(torch.zeros_like(first[0]))
    module.layers[1].blobs[0] = replacement
    assert watch() is not first and watch()[0] is replacement


def test_a_runtime_failing_on_a_call_leaves_the_net_on_torch(nets, caplog):
    net, ref = nets

    def broken():
        raise RuntimeError("simulated runtime failure")
    net._fast._steady.call = broken
    net._fast.choice.forward.call._run = broken
    _same(net, ref, 13)
    assert net.engine == "torch"
    assert "onnxruntime failed (simulated runtime failure)" in caplog.text
    _same(net, ref, 14)
