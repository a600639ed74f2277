"""Python layers through ``import caffe``, checked as BVLC's test_python_layer.py does:
forward/backward through three layers (backward before any forward), reshape, an
exception from setup reaching the caller unchanged, a learnable blob added with
``self.blobs.add_blob`` (diff, save/load, sharing) and the phase attribute."""
from pathlib import Path

import pytest

import caffe

HEADER = "name: 'pythonnet' force_backward: true\n"
INPUT = "input: 'data' input_shape { dim: 10 dim: 9 dim: 8 }\n"


def _py(name, bottom, top, cls):
    bottom = f"bottom: '{bottom}'" if bottom else ""
    return (f"layer {{ type: 'Python' name: '{name}' {bottom} top: '{top}' python_param "
            f"{{ module: 'pycaffe_layer_examples' layer: '{cls}' }} }}\n")


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _net(tmp_path, text, phase=caffe.TRAIN):
    path = tmp_path / "py.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase), str(path)


def _three(tmp_path):
    text = HEADER + INPUT + _py("one", "data", "one", "TimesTenLayer") + \
        _py("two", "one", "two", "TimesTenLayer") + _py("three", "two", "three", "TimesTenLayer")
    return _net(tmp_path, text)[0]


def test_forward(tmp_path):
    net = _three(tmp_path)
    net.blobs["data"].data[...] = 8
    net.forward()
    assert (net.blobs["three"].data == 10 ** 3 * 8).all()


def test_backward_before_forward(tmp_path):
    net = _three(tmp_path)
    net.blobs["three"].diff[...] = 7
    net.backward()
    assert (net.blobs["data"].diff == 10 ** 3 * 7).all()


def test_reshape(tmp_path):
    net = _three(tmp_path)
    net.blobs["data"].reshape(4, 4, 4, 4)
    net.forward()
    assert all(d == 4 for blob in net.blobs.values() for d in blob.data.shape)


def test_setup_exception_is_unchanged(tmp_path):
    with pytest.raises(RuntimeError) as info:
        _net(tmp_path, HEADER + INPUT + _py("layer", "data", "top", "FailingSetupLayer"))
    assert type(info.value) is RuntimeError and str(info.value) == "setup refused"


def test_learnable_blob(tmp_path):
    net, path = _net(tmp_path, HEADER + INPUT + _py("layer", "data", "top", "OneBlobLayer"))
    net.forward()
    net.backward()
    layer = net.layers[list(net._layer_names).index("layer")]
    assert layer.blobs[0].data[0] == 0 and layer.blobs[0].diff[0] == 1
    layer.blobs[0].data[0] += layer.blobs[0].diff[0]
    assert layer.blobs[0].data[0] == 1
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    layer.blobs[0].data[0] = -1
    net.copy_from(weights)
    assert layer.blobs[0].data[0] == 1
    other = caffe.Net(path, caffe.TRAIN)
    other.share_with(net)
    assert other.layers[list(other._layer_names).index("layer")].blobs[0].data[0] == 1


def test_phase(tmp_path):
    for phase in (caffe.TRAIN, caffe.TEST):
        net, _ = _net(tmp_path, HEADER + _py("layer", None, "phase", "PhaseLayer"), phase)
        assert net.forward()["phase"] == phase


def test_layer_type_list_has_python():
    assert "Python" in caffe.layer_type_list()
    assert caffe.layer_type_list() == sorted(set(caffe.layer_type_list()))
