"""HDF5Output writes its bottoms as datasets 'data' and 'label' (legacy 4-D), read back with h5py."""
import h5py
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.engine.layers.base import LayerError


def _net(tmp_path, out):
    text = f'''
    layer {{ name: "input" type: "Input" top: "data" top: "label"
             input_param {{ shape {{ dim: 3 dim: 2 dim: 2 }} shape {{ dim: 3 }} }} }}
    layer {{ name: "out" type: "HDF5Output" bottom: "data" bottom: "label"
             hdf5_output_param {{ file_name: "{out}" }} }}'''
    (tmp_path / "net.prototxt").write_text(text)
    return caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)


def test_writes_data_and_label_datasets(tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"old content")
    net = _net(tmp_path, out)
    with h5py.File(out, "r") as f:            # truncated to an empty HDF5 file at setup
        assert list(f) == []
    data = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = [2, 0, 1]
    net.forward()
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["data", "label"]
        np.testing.assert_array_equal(f["data"][()], data.reshape(3, 2, 2, 1))
        np.testing.assert_array_equal(f["label"][()], np.array([2, 0, 1], np.float32)
                                      .reshape(3, 1, 1, 1))
        assert f["data"].dtype == np.float32


def test_second_forward_is_a_clear_error(tmp_path):
    net = _net(tmp_path, tmp_path / "out.h5")
    net.forward()
    with pytest.raises(LayerError, match="already holds a batch"):
        net.forward()


def test_needs_a_file_name(tmp_path):
    with pytest.raises(LayerError, match="file_name is required"):
        _net(tmp_path, "")
