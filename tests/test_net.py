"""Net assembly: state filtering, wiring errors, Splits, loss weights, sharing, propagate_down."""
import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.formats.blob_io import ProtoTextError
from caffe_compat.engine.layers.base import LayerError
from caffe_compat.engine.net.assemble import NetDefinitionError

INPUT = 'layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'


def net_from(tmp_path, text, phase=caffe.TEST, **kw):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase, **kw)


def test_unknown_layer_type_lists_known_types(tmp_path):
    with pytest.raises(LayerError, match=r"net.prototxt:2: layer 'f': Unknown layer type: Foo "
                       r"\(no supported fork defines it\); known types: .*Convolution"):
        net_from(tmp_path, INPUT + 'layer { name: "f" type: "Foo" bottom: "data" top: "f" }')


def test_unknown_layer_type_suggests_close_names_and_names_forks(tmp_path):
    with pytest.raises(LayerError, match=r"Unknown layer type: Convolutoin \(no supported fork "
                       r"defines it\); did you mean Convolution"):
        net_from(tmp_path, INPUT + 'layer { name: "c" type: "Convolutoin" bottom: "data" top: "c" }')
    with pytest.raises(LayerError, match=r"layer 'm': Unknown layer type: DenseCRF "
                       r"\(defined by DeepLab v2 caffe \(deeplab-public-ver2; also "
                       r"hszhao/PSPNet\), which this project does not implement\)"):
        net_from(tmp_path, INPUT + 'layer { name: "m" type: "DenseCRF" bottom: "data" top: "v" }')


def test_unknown_field_names_file_line_layer_and_fork(tmp_path):
    text = INPUT + ('layer {\n  name: "yolo"\n  type: "Yolov3"\n'
                    '  yolov3_param { num_classes: 20 }\n}\n')
    with pytest.raises(ProtoTextError, match=r"net.prototxt:5:\d+: layer 'yolo': caffe.LayerParameter "
                       r"has no field 'yolov3_param' \(defined by eric612/MobileNet-YOLO"):
        net_from(tmp_path, text)
    text = INPUT + ('layer {\n  name: "crf"\n  type: "DenseCRF"\n  dense_crf_param {\n'
                    '    max_iter: 10\n  }\n}\n')
    with pytest.raises(ProtoTextError, match=r"net.prototxt:5:\d+: layer 'crf': caffe.LayerParameter "
                       r"has no field 'dense_crf_param' \(defined by DeepLab v2"):
        net_from(tmp_path, text)
    text = INPUT + 'layer { name: "p" type: "Pooling" bottom: "data" pooling_param { kernel: 2 } }'
    with pytest.raises(ProtoTextError, match=r"net.prototxt:2:\d+: layer 'p': caffe.PoolingParameter "
                       r"has no field 'kernel' \(no supported fork defines it\)"):
        net_from(tmp_path, text)


def test_missing_bottom_names_layer_blob_and_index(tmp_path):
    with pytest.raises(NetDefinitionError,
                       match=r"Unknown bottom blob 'nope' \(layer 'r', bottom index 0\)"):
        net_from(tmp_path, INPUT + 'layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }')


def test_two_producers_of_one_top_rejected(tmp_path):
    text = INPUT + ('layer { name: "a" type: "ReLU" bottom: "data" top: "x" }\n'
                    'layer { name: "b" type: "TanH" bottom: "data" top: "x" }')
    with pytest.raises(NetDefinitionError, match="'x' of layer 'b' is already produced by layer 'a'"):
        net_from(tmp_path, text)


def test_wrong_bottom_count_names_layer(tmp_path):
    with pytest.raises(LayerError, match=r"layer 'e' \(Eltwise\) takes at least 2 bottom"):
        net_from(tmp_path, INPUT + 'layer { name: "e" type: "Eltwise" bottom: "data" top: "e" }')


def test_parse_error_names_file_line_and_field(tmp_path):
    with pytest.raises(ProtoTextError, match=r"net.prototxt:2:\d+: .*bogus"):
        net_from(tmp_path, INPUT + 'layer { name: "r" bogus: 1 }')


def test_netstate_rules(tmp_path):
    text = INPUT + '''
layer { name: "train_only" type: "ReLU" bottom: "data" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "TanH" bottom: "data" top: "b" include { phase: TEST } }
layer { name: "staged" type: "Sigmoid" bottom: "data" top: "c" include { stage: "deploy" } }
layer { name: "not_lvl" type: "AbsVal" bottom: "data" top: "d" exclude { min_level: 2 } }
'''
    names = lambda net: net._layer_names
    assert "train_only" in names(net_from(tmp_path, text, caffe.TRAIN))
    test = net_from(tmp_path, text, caffe.TEST)
    assert "test_only" in names(test) and "train_only" not in names(test)
    assert "staged" in names(net_from(tmp_path, text, caffe.TEST, stages=["deploy"]))
    assert "staged" not in names(test)
    assert "not_lvl" not in names(net_from(tmp_path, text, caffe.TEST, level=3))


def test_include_and_exclude_together_rejected(tmp_path):
    text = INPUT + ('layer { name: "r" type: "ReLU" bottom: "data" top: "r" '
                    'include { phase: TEST } exclude { phase: TRAIN } }')
    with pytest.raises(NetDefinitionError, match="'r' has both include and exclude"):
        net_from(tmp_path, text)


def test_split_insertion_names_and_loss_weight_move(tmp_path):
    text = INPUT + '''
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" loss_weight: 2
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "r" type: "ReLU" bottom: "ip" top: "r" }
'''
    net = net_from(tmp_path, text)
    assert net._layer_names == ["input", "ip", "ip_ip_0_split", "r"]
    assert net.top_names["ip_ip_0_split"] == ["ip_ip_0_split_0", "ip_ip_0_split_1"]
    assert net.bottom_names["r"] == ["ip_ip_0_split_1"]
    assert net.module.loss_weights == {"ip_ip_0_split_0": 2.0}
    net.blobs["data"].data[...] = np.arange(6).reshape(2, 3)
    net.forward()
    net.backward()
    # d(2*sum(ip))/dW = 2 * sum over batch of x
    np.testing.assert_allclose(net.params["ip"][0].diff,
                               2 * np.tile(np.arange(6).reshape(2, 3).sum(0), (2, 1)), rtol=1e-6)


def test_shared_params_are_one_tensor_and_grads_add(tmp_path):
    # force_backward: without a loss Caffe's Net::Init marks every layer "does not need
    # backward computation" and backward computes nothing
    text = "force_backward: true\n" + INPUT + '''
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" }
        inner_product_param { num_output: 2 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "b" type: "InnerProduct" bottom: "data" top: "b" param { name: "w" }
        inner_product_param { num_output: 2 bias_term: false } }
'''
    net = net_from(tmp_path, text)
    assert net.module.layers[2].blobs[0] is net.module.layers[3].blobs[0]
    assert [p.name for p in net.module.learnable_params] == ["a/0"]
    net.params["a"][0].data[...] = 0.5
    assert net.params["b"][0].data[0, 0] == 0.5
    net.blobs["data"].data[...] = 1.0
    net.forward()
    net.backward(a=np.ones((2, 2), np.float32), b=np.ones((2, 2), np.float32))
    # each use contributes sum over the batch of x = 2; the shared diff is their sum
    np.testing.assert_allclose(net.params["a"][0].diff, np.full((2, 3), 4.0))


def test_shared_param_shape_mismatch(tmp_path):
    text = INPUT + '''
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } inner_product_param { num_output: 2 } }
layer { name: "b" type: "InnerProduct" bottom: "data" top: "b" param { name: "w" } inner_product_param { num_output: 4 } }
'''
    with pytest.raises(LayerError, match="cannot share param 'w' between layers 'a'"):
        net_from(tmp_path, text)


def test_propagate_down_false_cuts_gradient(tmp_path):
    text = 'force_backward: true\n' + INPUT + '''
layer { name: "t" type: "TanH" bottom: "data" top: "t" propagate_down: false }
layer { name: "loss" type: "EuclideanLoss" bottom: "t" bottom: "data" top: "loss" propagate_down: true propagate_down: false }
'''
    net = net_from(tmp_path, text)
    net.blobs["data"].data[...] = np.ones((2, 3))
    net.forward()
    net.backward()
    assert np.all(net.blobs["data"].diff == 0)


def test_lr_mult_zero_param_has_no_grad_without_force_backward(tmp_path):
    text = INPUT + '''
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { lr_mult: 0 } param { lr_mult: 1 }
        inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "loss" }
'''
    net = net_from(tmp_path, text)
    ip = net.module.layers[1]
    assert not ip.blobs[0].requires_grad and ip.blobs[1].requires_grad
    lp = {p.name: (p.lr_mult, p.decay_mult) for p in net.module.learnable_params}
    assert lp == {"ip/0": (0.0, 1.0), "ip/1": (1.0, 1.0)}


def test_outputs_alphabetical_and_inputs(tmp_path):
    text = INPUT + ('layer { name: "z" type: "ReLU" bottom: "data" top: "zz" }\n'
                    'layer { name: "a" type: "TanH" bottom: "data" top: "aa" }')
    net = net_from(tmp_path, text)
    assert net.outputs == ["aa", "zz"] and net.inputs == ["data"]


def test_module_forward_returns_output_tensors(tmp_path):
    text = INPUT + 'layer { name: "t" type: "TanH" bottom: "data" top: "t" }'
    net = net_from(tmp_path, text)
    x = torch.randn(2, 3)
    out = net.module(data=x)
    assert list(out) == ["t"]
    torch.testing.assert_close(out["t"], torch.tanh(x))
    with pytest.raises(KeyError, match="input blob 'data' was not fed"):
        net.module()


def test_single_quoted_layer_names_get_their_line_too(tmp_path):
    """FCN's, HED's and py-faster-rcnn's prototxts quote names with ': the file:line and the
    layer are found as for double quotes."""
    single = "layer { name: 'input' type: 'Input' top: 'data' input_param { shape { dim: 2 } } }\n"
    with pytest.raises(LayerError, match=r"net.prototxt:3: layer 'f': Unknown layer type: Foo"):
        net_from(tmp_path, single + "\nlayer { name: 'f' type: 'Foo' bottom: 'data' top: 'f' }")
    text = single + "layer {\n  name: 'p'\n  type: 'Pooling'\n  pooling_param { kernel: 2 }\n}\n"
    with pytest.raises(ProtoTextError, match=r"net.prototxt:5:\d+: layer 'p': caffe.Pooling"):
        net_from(tmp_path, text)
