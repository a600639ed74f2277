"""caffemodel / caffemodel.h5 reading and writing."""
from pathlib import Path

import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.engine.weights import WeightsError, read_net_weights

GOLDENS = Path(__file__).parent / "goldens"
SOLVER_NET = GOLDENS / "solvers" / "sgd_step" / "net.prototxt"


def _net():
    return caffe.Net(str(SOLVER_NET), caffe.TRAIN)


def test_caffes_own_caffemodels_load():
    net = _net()
    for model in sorted((GOLDENS / "solvers").glob("*/*.caffemodel")):
        net.copy_from(str(model))
        stored = read_net_weights(str(model))
        for layer in stored.layer:
            for i, blob in enumerate(layer.blobs):
                np.testing.assert_array_equal(net.params[layer.name][i].data.ravel(),
                                              np.asarray(blob.data, np.float32))


def test_roundtrip_is_byte_identical(tmp_path):
    net = _net()
    net.copy_from(str(GOLDENS / "solvers" / "sgd_step" / "init.caffemodel"))
    out = tmp_path / "w.caffemodel"
    net.save(str(out))
    other = _net()
    other.copy_from(str(out))
    for name, blobs in net.params.items():
        for a, b in zip(blobs, other.params[name]):
            assert a.data.tobytes() == b.data.tobytes()
    # The file holds every instantiated layer with its filled-in parameters, as Caffe's does.
    saved = read_net_weights(str(out))
    caffe_saved = read_net_weights(str(GOLDENS / "solvers" / "sgd_step" / "init.caffemodel"))
    assert [l.name for l in saved.layer] == [l.name for l in caffe_saved.layer]
    loss = [l for l in saved.layer if l.type == "SoftmaxWithLoss"][0]
    assert list(loss.loss_weight) == [1.0]


def test_hdf5_roundtrip(tmp_path):
    net = _net()
    net.copy_from(str(GOLDENS / "solvers" / "sgd_step" / "init.caffemodel"))
    out = tmp_path / "w.caffemodel.h5"
    net.save(str(out))
    other = _net()
    other.copy_from(str(out))
    for name, blobs in net.params.items():
        for a, b in zip(blobs, other.params[name]):
            assert a.data.tobytes() == b.data.tobytes()


def test_unknown_layers_skipped_and_shape_mismatch_named(tmp_path):
    net = _net()
    model = read_net_weights(str(GOLDENS / "solvers" / "sgd_step" / "init.caffemodel"))
    extra = model.layer.add(name="not_in_net", type="InnerProduct")
    extra.blobs.add().data.extend([1.0])
    path = tmp_path / "extra.caffemodel"
    path.write_bytes(model.SerializeToString())
    net.copy_from(str(path))               # skipped, no error
    victim = next(l for l in model.layer if len(l.blobs))
    del victim.blobs[0].shape.dim[:]
    victim.blobs[0].shape.dim.extend([1, 1])
    path.write_bytes(model.SerializeToString())
    with pytest.raises(WeightsError, match=f"layer '{victim.name}': shape mismatch.*rename the layer"):
        net.copy_from(str(path))


def test_not_a_caffemodel(tmp_path):
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(WeightsError, match="bad.caffemodel"):
        _net().copy_from(str(bad))
    with pytest.raises(WeightsError, match="missing.caffemodel"):
        _net().copy_from(str(tmp_path / "missing.caffemodel"))
