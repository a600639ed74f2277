"""Repeated layer names and anonymous loss tops, as BVLC's net.cpp handles them.

Caffe accepts two layers with one name (mnist_autoencoder, HED): both run, lookups by name
(pycaffe's OrderedDicts, layer_by_name, HDF5 weights) find the later one, while a binary
caffemodel and ShareTrainedLayersWith copy into the first. A loss layer written without a
top gets an anonymous ``(automatic)`` top that still counts in the net loss.
"""
import h5py
import numpy as np
import torch

import caffe_compat as caffe
from caffe_compat.engine.net.module import AUTO_TOP

INPUT = ('layer { name: "input" type: "Input" top: "data" top: "label" '
         'input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }\n')
TWO_IPS = INPUT + '''
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "a"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "b"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" } } }
'''


def net_from(tmp_path, text, phase=caffe.TEST, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return caffe.Net(str(path), phase)


def test_repeated_layer_names_both_run_and_lookups_find_the_later(tmp_path):
    net = net_from(tmp_path, TWO_IPS)
    assert net._layer_names == ["input", "data_input_0_split", "ip", "ip"]
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    w_a = net.module.layers[2].blobs[0].detach().numpy()
    w_b = net.module.layers[3].blobs[0].detach().numpy()
    np.testing.assert_allclose(net.blobs["a"].data, x @ w_a.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["b"].data, x @ w_b.T, rtol=1e-5, atol=1e-6)
    # pycaffe builds OrderedDicts from (name, layer) pairs: the later layer's value wins.
    assert net.params["ip"][0].data.shape == (5, 3)
    assert list(net.params) == ["ip"]
    assert net.top_names["ip"] == ["b"]
    assert net.module.layer_by_name("ip") is net.module.layers[3]
    assert net.module.layer_index("ip") == 2      # pycaffe's _layer_names.index: the first


def test_caffemodel_copies_into_the_first_layer_of_a_name(tmp_path):
    src = net_from(tmp_path, INPUT + '''
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "a"
                inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }''',
                   name="src.prototxt")
    src.save(str(tmp_path / "w.caffemodel"))
    net = net_from(tmp_path, INPUT + '''
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "a"
                inner_product_param { num_output: 2 } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "b"
                inner_product_param { num_output: 2 } }''', name="dst.prototxt")
    net.copy_from(str(tmp_path / "w.caffemodel"))
    expected = src.params["ip"][0].data
    np.testing.assert_array_equal(net.module.layers[2].blobs[0].detach().numpy(), expected)
    assert not net.module.layers[3].blobs[0].detach().numpy().any()   # constant filler: 0


def test_hdf5_weights_copy_into_the_last_layer_of_a_name(tmp_path):
    net = net_from(tmp_path, TWO_IPS.replace("num_output: 2", "num_output: 5"))
    w = np.arange(15, dtype=np.float32).reshape(5, 3)
    with h5py.File(tmp_path / "w.caffemodel.h5", "w") as f:
        f.create_dataset("data/ip/0", data=w)
        f.create_dataset("data/ip/1", data=np.ones(5, np.float32))
    net.copy_from(str(tmp_path / "w.caffemodel.h5"))
    np.testing.assert_array_equal(net.module.layers[3].blobs[0].detach().numpy(), w)
    assert not np.array_equal(net.module.layers[2].blobs[0].detach().numpy(), w)


def test_repeated_loss_layer_names_as_in_mnist_autoencoder(tmp_path):
    net = net_from(tmp_path, INPUT + '''
        layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "data" top: "l1" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "l2"
                loss_weight: 0 }''')
    net.blobs["label"].data[...] = [0, 1, 2, 0]
    out = net.forward()
    assert set(out) == {"l1", "l2"} and out["l1"] == 0 and out["l2"] > 0


def test_loss_layer_without_top_gets_an_anonymous_top_with_weight_one(tmp_path):
    net = net_from(tmp_path, INPUT + '''
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" }''',
                   phase=caffe.TRAIN)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 2], np.float32)
    assert AUTO_TOP in net.blobs and net.outputs == []
    assert net.module.loss_weights == {AUTO_TOP: 1.0}
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = y
    net.forward()
    logp = torch.log_softmax(torch.from_numpy(x).double(), 1)
    expected = -logp[torch.arange(4), torch.from_numpy(y).long()].mean().item()
    np.testing.assert_allclose(net.blobs[AUTO_TOP].data, expected, rtol=1e-5)
    loss = net.module.forward_loss(data=torch.from_numpy(x), label=torch.from_numpy(y))[0]
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    # The definition itself is unchanged: a saved caffemodel lists no top, as Caffe's does.
    assert list(net.module.net_param.layer[1].top) == []


def test_two_topless_losses_both_count(tmp_path):
    net = net_from(tmp_path, INPUT + '''
        layer { name: "l1" type: "EuclideanLoss" bottom: "data" bottom: "data" }
        layer { name: "l2" type: "SoftmaxWithLoss" bottom: "data" bottom: "label"
                loss_weight: 2 }''')
    assert net.module.loss_weights == {AUTO_TOP: 1.0, AUTO_TOP + "_1": 2.0}


def test_anonymous_top_cannot_be_read_by_a_later_layer(tmp_path):
    import pytest
    from caffe_compat.engine.net.assemble import NetDefinitionError
    with pytest.raises(NetDefinitionError, match="Unknown bottom blob"):
        net_from(tmp_path, INPUT + '''
            layer { name: "l1" type: "EuclideanLoss" bottom: "data" bottom: "data" }
            layer { name: "r" type: "ReLU" bottom: "(automatic)" top: "r" }''')


def test_non_loss_layer_without_top_still_fails(tmp_path):
    import pytest
    from caffe_compat.engine.layers.base import LayerError
    with pytest.raises(LayerError, match="takes 1 top"):
        net_from(tmp_path, INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" }')
