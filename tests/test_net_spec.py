"""NetSpec: BVLC's test_net_spec.py checks, and to_proto() text compared with real pycaffe
output (the LeNet notebook's printed prototxt, the FCN repo's generated prototxts) and
with CaffeNet's auto-naming worked out from pycaffe's rules."""
from pathlib import Path

import pytest

import caffe_compat as caffe
from caffe_compat import layers as L, params as P
from caffe_compat.coord_map import crop

DATA = Path(__file__).parent / "data" / "net_spec"


def lenet(batch_size):
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]),
                                         dict(dim=[batch_size, 1, 1, 1])],
                                  transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def anon_lenet(batch_size):
    data, label = L.DummyData(shape=[dict(dim=[batch_size, 1, 28, 28]),
                                     dict(dim=[batch_size, 1, 1, 1])],
                              transform_param=dict(scale=1. / 255), ntop=2)
    conv1 = L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    conv2 = L.Convolution(pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier"))
    pool2 = L.Pooling(conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool2, num_output=500, weight_filler=dict(type="xavier"))
    relu1 = L.ReLU(ip1, in_place=True)
    ip2 = L.InnerProduct(relu1, num_output=10, weight_filler=dict(type="xavier"))
    return L.SoftmaxWithLoss(ip2, label).to_proto()


def _load(tmp_path, proto):
    path = tmp_path / "net.prototxt"
    path.write_text(str(proto))
    return caffe.Net(str(path), caffe.TEST)


@pytest.mark.parametrize("make", [lenet, anon_lenet])
def test_lenet_builds_with_in_place_relu(tmp_path, make):
    proto = make(50)
    assert proto.layer[6].bottom == proto.layer[6].top
    assert len(_load(tmp_path, proto).layers) == 9


def test_anonymous_names_count_per_type():
    proto = anon_lenet(50)
    assert [l.name for l in proto.layer] == [
        "DummyData1", "Convolution1", "Pooling1", "Convolution2", "Pooling2",
        "InnerProduct1", "ReLU1", "InnerProduct2", "SoftmaxWithLoss1"]
    assert list(proto.layer[0].top) == ["DummyData1", "DummyData2"]
    assert list(proto.layer[8].bottom) == ["InnerProduct2", "DummyData2"]


def test_zero_tops(tmp_path):
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    proto = n.to_proto()
    assert [l.name for l in proto.layer] == ["data", "silence_data", "silence_data2"]
    assert len(_load(tmp_path, proto).forward()) == 0


def test_type_error_for_non_top_inputs():
    data = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is "
                                        r"<class 'tuple'>\)$"):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)


def test_missing_top_is_a_key_and_attribute_error():
    n = caffe.NetSpec()
    with pytest.raises(KeyError):
        n["nope"]
    assert not hasattr(n, "nope")


def test_ssd_netspec_methods_keys_update_and_delete():
    """weiliu89/caffe's additions that its model_libs relies on: ``keys()[-1]`` is the last
    top set, ``update`` merges parameters into that top's layer, ``del`` forgets a top."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.relu = L.ReLU(n.conv, in_place=True)
    assert n.keys() == ["data", "conv", "relu"] and n.vals()[1] is n.conv
    n.update("conv", {"dilation": 2, "pad": 2, "param": [dict(lr_mult=0)]})
    conv = n.to_proto().layer[1]
    assert (list(conv.convolution_param.dilation), list(conv.convolution_param.pad),
            conv.param[0].lr_mult) == ([2], [2], 0)
    with pytest.raises(ValueError, match="'ntop' is fixed"):
        n.update("conv", {"ntop": 2})
    del n["relu"]
    assert n.keys() == ["data", "conv"] and [l.name for l in n.to_proto().layer] == [
        "data", "conv"]


def notebook_lenet(lmdb, batch_size):
    """examples/01-learning-lenet.ipynb's net definition."""
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def _block(name, type_, bottoms, tops, body=""):
    lines = [f'  name: "{name}"', f'  type: "{type_}"']
    lines += [f'  bottom: "{b}"' for b in bottoms] + [f'  top: "{t}"' for t in tops]
    return "layer {\n" + "\n".join(lines) + "\n" + body + "}\n"


def _xavier(field, **values):
    inner = "".join(f"    {k}: {v}\n" for k, v in values.items())
    return f"  {field} {{\n{inner}    weight_filler {{\n      type: \"xavier\"\n    }}\n  }}\n"


POOL = "  pooling_param {\n    pool: MAX\n    kernel_size: 2\n    stride: 2\n  }\n"


def test_notebook_lenet_text_equals_the_notebook_output():
    # The notebook's own printed file (pycaffe on Python 2) reads "scale: 0.00392156862745";
    # that float's digits are the protobuf library's printing, here 9 significant digits.
    scale = str(notebook_lenet("x", 1).layer[0].transform_param).split()[1]
    expected = (
        _block("data", "Data", [], ["data", "label"],
               f"  transform_param {{\n    scale: {scale}\n  }}\n"
               '  data_param {\n    source: "mnist/mnist_train_lmdb"\n    batch_size: 64\n'
               "    backend: LMDB\n  }\n")
        + _block("conv1", "Convolution", ["data"], ["conv1"],
                 _xavier("convolution_param", num_output=20, kernel_size=5))
        + _block("pool1", "Pooling", ["conv1"], ["pool1"], POOL)
        + _block("conv2", "Convolution", ["pool1"], ["conv2"],
                 _xavier("convolution_param", num_output=50, kernel_size=5))
        + _block("pool2", "Pooling", ["conv2"], ["pool2"], POOL)
        + _block("fc1", "InnerProduct", ["pool2"], ["fc1"],
                 _xavier("inner_product_param", num_output=500))
        + _block("relu1", "ReLU", ["fc1"], ["fc1"])
        + _block("score", "InnerProduct", ["fc1"], ["score"],
                 _xavier("inner_product_param", num_output=10))
        + _block("loss", "SoftmaxWithLoss", ["score", "label"], ["loss"]))
    assert str(notebook_lenet("mnist/mnist_train_lmdb", 64)) == expected
    assert scale == "0.00392156886"          # float32(1/255), printed by protobuf >= 4
