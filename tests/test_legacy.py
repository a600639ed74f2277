"""Old model-zoo definitions: V1 `layers {}` + input_dim prototxt and a V1 caffemodel."""
from pathlib import Path

import numpy as np

import caffe_compat as caffe
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.engine.net.upgrade import upgrade_net
from caffe_compat.proto import caffe_pb2

CASE = Path(__file__).parent / "goldens" / "legacy" / "v1_deploy"


def test_v1_deploy_matches_caffe():
    net = caffe.Net(str(CASE / "deploy_v1.prototxt"), str(CASE / "weights_v1.caffemodel"),
                    caffe.TEST)
    golden = np.load(CASE / "golden.npz")
    net.blobs["data"].data[...] = golden["in/data"]
    net.forward()
    for key in golden.files:
        kind, _, name = key.partition("/")
        if kind == "blob":
            np.testing.assert_allclose(net.blobs[name].data, golden[key], rtol=1e-4, atol=1e-5)
        elif kind == "param":
            layer, i = name.rsplit("/", 1)
            assert net.params[layer][int(i)].shape == golden[key].shape
            np.testing.assert_allclose(net.params[layer][int(i)].data, golden[key], rtol=1e-6)


def test_v1_upgrade_maps_types_and_multipliers():
    param = upgrade_net(read_text_proto(str(CASE / "deploy_v1.prototxt"), caffe_pb2.NetParameter))
    assert not param.layers and not param.input and not param.input_dim
    assert [l.type for l in param.layer][:4] == ["Input", "Convolution", "ReLU", "Pooling"]
    assert list(param.layer[0].input_param.shape[0].dim) == [2, 3, 12, 12]
    conv = param.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]


def test_batchnorm_three_param_specs_are_dropped():
    text = 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" ' + \
           'param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } }'
    param = upgrade_net(read_text_proto(text, caffe_pb2.NetParameter))
    assert len(param.layer[0].param) == 0


def test_input_shape_form():
    text = 'input: "a" input_shape { dim: 1 dim: 2 } input: "b" input_shape { dim: 3 }'
    param = upgrade_net(read_text_proto(text, caffe_pb2.NetParameter))
    assert list(param.layer[0].top) == ["a", "b"]
    assert [list(s.dim) for s in param.layer[0].input_param.shape] == [[1, 2], [3]]
