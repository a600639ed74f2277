"""The pycaffe surface: Net constructors, blobs/params views, partial forward, accumulation."""
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import caffe_compat as caffe

GOLDENS = Path(__file__).parent / "goldens"
CASE = GOLDENS / "layers" / "inplace_chain"
NET = str(CASE / "net.prototxt")
WEIGHTS = str(CASE / "init.caffemodel")


def _fed(net):
    net.blobs["data"].data[...] = np.load(CASE / "golden.npz")["in/data"]
    return net


def test_constructor_forms_agree():
    a = caffe.Net(NET, WEIGHTS, caffe.TEST)
    b = caffe.Net(NET, caffe.TEST, weights=WEIGHTS)
    c = caffe.Net(NET, phase=caffe.TEST, weights=WEIGHTS)
    for net in (b, c):
        np.testing.assert_array_equal(net.params["conv"][0].data, a.params["conv"][0].data)
    with pytest.raises(TypeError, match="needs a phase"):
        caffe.Net(NET)


def test_constructor_takes_level_stages_weights_positionally(tmp_path):
    """_caffe.cpp's Net(network_file, phase, level=0, stages=None, weights=None) takes its
    arguments by position too; a string second argument means the legacy (weights, phase)."""
    a = caffe.Net(NET, WEIGHTS, caffe.TEST)
    d = caffe.Net(NET, caffe.TEST, 0, ["deploy"], WEIGHTS)
    np.testing.assert_array_equal(d.params["conv"][0].data, a.params["conv"][0].data)
    leveled = tmp_path / "levels.prototxt"
    leveled.write_text("""input: 'data' input_shape { dim: 1 dim: 2 }
    layer { name: 'deep' type: 'ReLU' bottom: 'data' top: 'r' include { min_level: 1 } }""")
    assert caffe.Net(str(leveled), caffe.TEST, 1)._layer_names[-1] == "deep"
    assert caffe.Net(str(leveled), caffe.TEST)._layer_names[-1] == "input"


def test_views_and_metadata():
    net = caffe.Net(NET, WEIGHTS, caffe.TEST)
    assert isinstance(net.blobs, OrderedDict) and isinstance(net.params, OrderedDict)
    assert list(net.blobs) == ["data", "conv", "out"]
    assert [l.type for l in net.layers] == ["Input", "Convolution", "ReLU", "Dropout", "Pooling"]
    assert net.blobs["conv"].shape == (2, 4, 4, 4) and net.blobs["conv"].count == 128
    assert net.blobs["data"].num == 2 and net.blobs["data"].channels == 3
    # params are live views: writes change the model
    net.params["conv"][1].data[...] = 100.0
    out = _fed(net).forward()
    assert out["out"].min() > 50
    assert len(net.layers[1].blobs) == 2 and net.layers[1].blobs[0].shape == (4, 3, 3, 3)


def test_forward_kwargs_and_start_end():
    net = caffe.Net(NET, WEIGHTS, caffe.TEST)
    x = np.load(CASE / "golden.npz")["in/data"]
    full = net.forward(data=x)["out"].copy()
    partial = net.forward(end="conv")
    assert list(partial) == ["conv"]
    net.blobs["conv"].data[...] *= 0
    assert net.forward(start="pool")["out"].max() == 0
    again = net.forward(data=x, blobs=["conv"])
    np.testing.assert_array_equal(again["out"], full)
    assert "conv" in again
    with pytest.raises(ValueError, match="'data' has shape"):
        net.forward(data=np.zeros((1, 3, 6, 6)))


def test_param_diffs_accumulate_until_cleared():
    net = _fed(caffe.Net(NET, WEIGHTS, caffe.TEST))
    net.forward()
    net.backward(out=np.ones((2, 4, 2, 2), np.float32))
    once = net.params["conv"][0].diff.copy()
    net.forward()
    net.backward(out=np.ones((2, 4, 2, 2), np.float32))
    np.testing.assert_allclose(net.params["conv"][0].diff, 2 * once, rtol=1e-6)
    net.clear_param_diffs()
    assert not net.params["conv"][0].diff.any()


def test_reshape_propagates_input_shape():
    net = caffe.Net(NET, WEIGHTS, caffe.TEST)
    net.blobs["data"].reshape(5, 3, 10, 10)
    net.reshape()
    assert net.blobs["conv"].shape == (5, 4, 8, 8) and net.blobs["out"].shape == (5, 4, 4, 4)
    out = net.forward(data=np.ones((5, 3, 10, 10), np.float32))
    assert out["out"].shape == (5, 4, 4, 4)


def test_share_with_uses_same_storage():
    a = caffe.Net(NET, WEIGHTS, caffe.TEST)
    b = caffe.Net(NET, caffe.TEST)
    b.share_with(a)
    a.params["conv"][0].data[...] = 3.0
    assert np.all(b.params["conv"][0].data == 3.0)


def test_io_blobproto_and_transformer():
    mean = caffe.io.blobproto_to_array(
        caffe.proto.caffe_pb2.BlobProto.FromString(
            (GOLDENS / "data" / "mean_color32.binaryproto").read_bytes()))
    assert mean.shape == (1, 3, 32, 32)
    t = caffe.io.Transformer({"data": (1, 3, 8, 8)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", np.array([1.0, 2.0, 3.0]))
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    x = t.preprocess("data", img)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[0], img[:, :, 2] * 255 - 1.0, rtol=1e-6)
    np.testing.assert_allclose(t.deprocess("data", x), img, rtol=1e-5, atol=1e-6)


def test_load_image(tmp_path):
    import cv2
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255                                  # pure blue in OpenCV's BGR
    cv2.imwrite(str(tmp_path / "b.png"), bgr)
    rgb = caffe.io.load_image(str(tmp_path / "b.png"))
    assert rgb.shape == (4, 5, 3) and rgb[0, 0].tolist() == [0.0, 0.0, 1.0]
    assert caffe.io.load_image(str(tmp_path / "b.png"), color=False).shape == (4, 5, 1)
    with pytest.raises(IOError, match="missing.png"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def test_gpu_mode_fails_clearly_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        caffe.set_mode_gpu()
    caffe.set_mode_cpu()
