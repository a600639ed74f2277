"""``caffe.model_libs`` (weiliu89/caffe's SSD net builders): SSD300 built the way
examples/ssd/ssd_pascal.py builds it, then parsed and run by our Net and checked against
closed-form facts (prior counts, feature-map sizes, the layer names the released SSD models
use); the train net as our parser sees it; the ResNet blocks' names and arithmetic; and each
base body built and run. (Our own code, written after reading what those scripts call.)"""
from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest

import caffe
from caffe.model_libs import (ConvBNLayer, CreateAnnotatedDataLayer, CreateMultiBoxHead,
                              InceptionV3Body, L, P, ResBody, ResNet101Body, ResNet152Body,
                              UnpackVariable, VGGNetBody, ZFNetBody, caffe_pb2)
from caffe_compat._pycaffe.net import read_net_prototxt
from caffe_compat.engine.net.assemble import filter_net, insert_splits, make_state

# SSD300 on VOC: ssd_pascal.py's settings.
SOURCES = ["conv4_3", "fc7", "conv6_2", "conv7_2", "conv8_2", "conv9_2"]
MAP_SIDES = [38, 19, 10, 5, 3, 1]
ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
NUM_CLASSES = 21
# (name, channels, kernel, pad, stride) of the layers SSD adds after fc7
EXTRA_LAYERS = [("conv6_1", 256, 1, 0, 1), ("conv6_2", 512, 3, 1, 2),
                ("conv7_1", 128, 1, 0, 1), ("conv7_2", 256, 3, 1, 2),
                ("conv8_1", 128, 1, 0, 1), ("conv8_2", 256, 3, 0, 1),
                ("conv9_1", 128, 1, 0, 1), ("conv9_2", 256, 3, 0, 1)]


def _prior_sizes(min_dim=300, min_ratio=20, max_ratio=90):
    """ssd_pascal.py's min/max sizes: 10% and 20% for conv4_3, then evenly spaced ratios."""
    step = (max_ratio - min_ratio) // (len(SOURCES) - 2)
    ratios = range(min_ratio, max_ratio + 1, step)
    min_sizes = [min_dim * 10 / 100.] + [min_dim * r / 100. for r in ratios]
    max_sizes = [min_dim * 20 / 100.] + [min_dim * (r + step) / 100. for r in ratios]
    return min_sizes, max_sizes


def _ssd300(net):
    """The body, extra layers and multibox head as ssd_pascal.py builds them; returns the
    head's tops."""
    VGGNetBody(net, from_layer="data", fully_conv=True, reduced=True, dilated=True,
               dropout=False)
    bottom = net.keys()[-1]
    for name, channels, kernel, pad, stride in EXTRA_LAYERS:
        ConvBNLayer(net, bottom, name, False, True, channels, kernel, pad, stride, lr_mult=1)
        bottom = name
    min_sizes, max_sizes = _prior_sizes()
    return CreateMultiBoxHead(
        net, data_layer="data", from_layers=SOURCES, use_batchnorm=False,
        min_sizes=min_sizes, max_sizes=max_sizes, aspect_ratios=ASPECT_RATIOS,
        steps=[8, 16, 32, 64, 100, 300], normalizations=[20, -1, -1, -1, -1, -1],
        num_classes=NUM_CLASSES, share_location=True, flip=True, clip=False,
        prior_variance=[0.1, 0.1, 0.2, 0.2], kernel_size=3, pad=1, lr_mult=1)


def _ssd300_test_net():
    """ssd_pascal.py's test net: AnnotatedData, SSD300, softmax over classes,
    DetectionOutput and DetectionEvaluate."""
    net = caffe.NetSpec()
    net.data, net.label = CreateAnnotatedDataLayer(
        "test_lmdb", batch_size=8, train=False, output_label=True, label_map_file="map",
        transform_param={"mean_value": [104, 117, 123],
                         "resize_param": {"prob": 1, "resize_mode": P.Resize.WARP,
                                          "height": 300, "width": 300,
                                          "interp_mode": [P.Resize.LINEAR]}})
    mbox = _ssd300(net)
    net.mbox_conf_reshape = L.Reshape(net.mbox_conf, shape=dict(dim=[0, -1, NUM_CLASSES]))
    net.mbox_conf_softmax = L.Softmax(net.mbox_conf_reshape, axis=2)
    net.mbox_conf_flatten = L.Flatten(net.mbox_conf_softmax, axis=1)
    mbox[1] = net.mbox_conf_flatten
    test_only = dict(include=dict(phase=caffe_pb2.Phase.Value("TEST")))
    net.detection_out = L.DetectionOutput(
        *mbox, detection_output_param={
            "num_classes": NUM_CLASSES, "share_location": True, "background_label_id": 0,
            "nms_param": {"nms_threshold": 0.45, "top_k": 400}, "keep_top_k": 200,
            "confidence_threshold": 0.01, "code_type": P.PriorBox.CENTER_SIZE}, **test_only)
    net.detection_eval = L.DetectionEvaluate(
        net.detection_out, net.label, detection_evaluate_param={
            "num_classes": NUM_CLASSES, "background_label_id": 0, "overlap_threshold": 0.5},
        **test_only)
    return net


@pytest.fixture(scope="module")
def ssd300_deploy(tmp_path_factory):
    """The deploy net as ssd_pascal.py writes it (test net less its first and last layer,
    an input of 1x3x300x300), loaded by caffe.Net and run once on a random image."""
    param = _ssd300_test_net().to_proto()
    del param.layer[0]
    del param.layer[-1]
    param.name = "VGG_VOC0712_SSD_300x300_deploy"
    param.input.extend(["data"])
    param.input_shape.extend([caffe_pb2.BlobShape(dim=[1, 3, 300, 300])])
    path = tmp_path_factory.mktemp("ssd") / "deploy.prototxt"
    path.write_text(str(param))
    net = caffe.Net(str(path), caffe.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(0).uniform(-50, 50, (1, 3, 300, 300))
    net.forward()
    return param, net


def test_star_import_gives_the_forks_namespace():
    names = {}
    exec("from caffe.model_libs import *", names)
    assert names["caffe"] is sys.modules["caffe"] and names["caffe_pb2"] is caffe.proto.caffe_pb2
    assert names["L"] is caffe.layers and names["P"] is caffe.params
    for name in ("check_if_exist", "make_if_not_exist", "UnpackVariable", "ConvBNLayer",
                 "ResBody", "InceptionTower", "CreateAnnotatedDataLayer", "ZFNetBody",
                 "VGGNetBody", "ResNet101Body", "ResNet152Body", "InceptionV3Body",
                 "CreateMultiBoxHead"):
        assert callable(names[name]), name
    assert sys.modules["caffe.model_libs"] is importlib.import_module("caffe_compat.model_libs")


def test_ssd300_priors_and_predictions_have_closed_form_sizes(ssd300_deploy):
    _, net = ssd300_deploy
    priors_per_cell = [4, 6, 6, 6, 4, 4]          # 1 + 1 (max size) + ratios, flipped
    num_priors = sum(s * s * k for s, k in zip(MAP_SIDES, priors_per_cell))
    assert num_priors == 8732
    assert net.blobs["mbox_priorbox"].data.shape == (1, 2, 4 * num_priors)
    assert net.blobs["mbox_loc"].data.shape == (1, 4 * num_priors)
    assert net.blobs["mbox_conf_flatten"].data.shape == (1, num_priors * NUM_CLASSES)
    for source, side in zip(SOURCES, MAP_SIDES):
        assert net.blobs[source].data.shape[2:] == (side, side), source
    # the softmax runs over the classes of each prior
    probs = net.blobs["mbox_conf_flatten"].data.reshape(num_priors, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert net.blobs["detection_out"].data.shape[-1] == 7


def test_ssd300_first_prior_and_prediction_order(ssd300_deploy):
    """Prior 0 is conv4_3's top-left cell (centre 4 px, side 30 px, in a 300 px image);
    the loc head is permuted to cell-major order, so its first four values are the
    conv4_3 predictor's first four channels at cell (0, 0)."""
    _, net = ssd300_deploy
    priors = net.blobs["mbox_priorbox"].data[0]
    np.testing.assert_allclose(priors[0, :4], np.array([4 - 15, 4 - 15, 4 + 15, 4 + 15]) / 300,
                               rtol=1e-5)
    np.testing.assert_allclose(priors[1, :8], [0.1, 0.1, 0.2, 0.2] * 2, rtol=1e-6)
    conv_loc = net.blobs["conv4_3_norm_mbox_loc"].data
    np.testing.assert_allclose(net.blobs["mbox_loc"].data[0, :4], conv_loc[0, :4, 0, 0],
                               rtol=1e-5)
    # the last prior is conv9_2's single cell: its last flipped-ratio box (1/2) is centred
    # at 150 px, 264/sqrt(2) wide and 264*sqrt(2) high (clip is off)
    w, h = 264 / math.sqrt(2) / 2, 264 * math.sqrt(2) / 2
    np.testing.assert_allclose(priors[0, -4:], np.array([150 - w, 150 - h, 150 + w, 150 + h])
                               / 300, rtol=1e-5)


def test_ssd300_layers_carry_the_released_models_names(ssd300_deploy):
    param, _ = ssd300_deploy
    layers = {layer.name: layer for layer in param.layer}
    expected = ["conv4_3_norm", "fc6", "fc7", "relu7"] + [name for name, *_ in EXTRA_LAYERS]
    expected += [f"{name}_relu" for name, *_ in EXTRA_LAYERS]
    for source in ["conv4_3_norm"] + SOURCES[1:]:
        expected += [f"{source}_mbox_{kind}{suffix}" for kind in ("loc", "conf")
                     for suffix in ("", "_perm", "_flat")] + [f"{source}_mbox_priorbox"]
    expected += ["mbox_loc", "mbox_conf", "mbox_priorbox", "mbox_conf_reshape",
                 "mbox_conf_softmax", "mbox_conf_flatten", "detection_out"]
    assert not [name for name in expected if name not in layers]
    assert "drop6" not in layers and "drop7" not in layers          # dropout=False
    fc6 = layers["fc6"].convolution_param                             # the atrous fc6
    assert (list(fc6.dilation), list(fc6.pad), list(fc6.kernel_size), fc6.num_output) == \
        ([6], [6], [3], 1024)
    assert list(layers["fc7"].convolution_param.kernel_size) == [1]
    assert layers["pool5"].pooling_param.stride == 1
    norm = layers["conv4_3_norm"].norm_param
    assert (norm.across_spatial, norm.channel_shared, norm.scale_filler.value) == \
        (False, False, 20)
    assert layers["conv4_3_norm_mbox_conf"].convolution_param.num_output == 4 * NUM_CLASSES
    assert layers["fc7_mbox_loc"].convolution_param.num_output == 6 * 4
    assert list(layers["fc7_mbox_loc_perm"].permute_param.order) == [0, 2, 3, 1]
    prior = layers["conv6_2_mbox_priorbox"].prior_box_param
    assert (list(prior.min_size), list(prior.max_size), list(prior.aspect_ratio),
            prior.step, prior.flip, prior.clip) == ([111], [162], [2, 3], 32, True, False)
    assert list(layers["conv9_2_mbox_priorbox"].bottom) == ["conv9_2", "data"]
    assert layers["mbox_priorbox"].concat_param.axis == 2


def test_ssd_pascal_train_net_is_accepted_by_our_parser(tmp_path):
    """ssd_pascal.py's train net (AnnotatedData with samplers, MultiBoxLoss), written as the
    script writes it, parses and wires for TRAIN; building it reaches AnnotatedData's source."""
    samplers = [{"sampler": {}, "max_trials": 1, "max_sample": 1}] + [
        {"sampler": {"min_scale": 0.3, "max_scale": 1.0, "min_aspect_ratio": 0.5,
                     "max_aspect_ratio": 2.0},
         "sample_constraint": {"min_jaccard_overlap": overlap}, "max_trials": 50,
         "max_sample": 1} for overlap in (0.1, 0.3, 0.5, 0.7, 0.9)]
    net = caffe.NetSpec()
    net.data, net.label = CreateAnnotatedDataLayer(
        "trainval_lmdb", batch_size=8, train=True, output_label=True,
        label_map_file="labelmap_voc.prototxt", batch_sampler=samplers,
        transform_param={"mirror": True, "mean_value": [104, 117, 123],
                         "expand_param": {"prob": 0.5, "max_expand_ratio": 4.0},
                         "emit_constraint": {"emit_type": caffe_pb2.EmitConstraint.CENTER}})
    mbox = _ssd300(net)
    mbox.append(net.label)
    net.mbox_loss = L.MultiBoxLoss(
        *mbox, multibox_loss_param={"loc_loss_type": P.MultiBoxLoss.SMOOTH_L1,
                                    "conf_loss_type": P.MultiBoxLoss.SOFTMAX,
                                    "num_classes": NUM_CLASSES, "neg_pos_ratio": 3.0,
                                    "mining_type": P.MultiBoxLoss.MAX_NEGATIVE},
        loss_param={"normalization": P.Loss.VALID},
        include=dict(phase=caffe_pb2.Phase.Value("TRAIN")),
        propagate_down=[True, True, False, False])
    path = tmp_path / "train.prototxt"
    with open(path, "w") as f:
        print('name: "VGG_VOC0712_SSD_300x300_train"', file=f)
        print(net.to_proto(), file=f)

    param = read_net_prototxt(str(path))
    assert param.name == "VGG_VOC0712_SSD_300x300_train"
    train = insert_splits(filter_net(param, make_state(caffe.TRAIN)))   # wires every bottom
    data, loss = param.layer[0], param.layer[-1]
    assert (data.name, data.type, list(data.top)) == ("data", "AnnotatedData", ["data", "label"])
    assert data.include[0].phase == caffe.TRAIN and data.data_param.backend == P.Data.LMDB
    assert len(data.annotated_data_param.batch_sampler) == 6
    assert list(loss.bottom) == ["mbox_loc", "mbox_conf", "mbox_priorbox", "label"]
    assert list(loss.propagate_down) == [True, True, False, False]
    assert len(train.layer) > len(param.layer)              # Split layers for shared tops
    assert len(filter_net(param, make_state(caffe.TEST)).layer) == len(param.layer) - 2
    with pytest.raises(Exception, match=r"\(AnnotatedData\): trainval_lmdb: database does "
                                        r"not exist"):
        caffe.Net(str(path), caffe.TRAIN)


def _input_net(shape):
    net = caffe.NetSpec()
    net.data = L.Input(shape=dict(dim=list(shape)))
    return net


def test_resnet_blocks_names_and_residual_sums(tmp_path):
    """ResNet naming (bn_/scale_ for conv1, bn2a_/scale2a_ inside blocks), BatchNorm and
    Scale in place, and the block computing relu(shortcut + branch2c)."""
    net = _input_net((2, 3, 16, 16))
    ConvBNLayer(net, "data", "conv1", use_bn=True, use_relu=True, num_output=8,
                kernel_size=3, pad=1, stride=1, bn_prefix="bn_", bn_postfix="",
                scale_prefix="scale_", scale_postfix="")
    ResBody(net, "conv1", "2a", out2a=4, out2b=4, out2c=16, stride=2, use_branch1=True)
    ResBody(net, "res2a", "2b", out2a=4, out2b=4, out2c=16, stride=1, use_branch1=False)
    param = net.to_proto()
    names = [layer.name for layer in param.layer]
    assert names[:8] == ["data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu",
                         "res2a_branch1", "bn2a_branch1", "scale2a_branch1"]
    assert names[-5:] == ["res2b_branch2c", "bn2b_branch2c", "scale2b_branch2c", "res2b",
                          "res2b_relu"]
    layers = {layer.name: layer for layer in param.layer}
    assert list(layers["bn2a_branch2b"].top) == ["res2a_branch2b"]          # in place
    assert not layers["res2a_branch2a"].convolution_param.bias_term
    assert [p.lr_mult for p in layers["bn_conv1"].param] == [0, 0, 0]
    assert layers["scale_conv1"].scale_param.bias_term
    assert list(layers["res2b"].bottom) == ["res2a", "res2b_branch2c"]    # identity shortcut

    path = tmp_path / "res.prototxt"
    path.write_text(str(param))
    run = caffe.Net(str(path), caffe.TEST)
    run.blobs["data"].data[...] = np.random.default_rng(1).normal(size=(2, 3, 16, 16))
    run.forward()
    blobs = {name: blob.data.copy() for name, blob in run.blobs.items()}
    assert blobs["res2b"].shape == (2, 16, 8, 8)
    for out, shortcut, branch in (("res2a", "res2a_branch1", "res2a_branch2c"),
                                  ("res2b", "res2a", "res2b_branch2c")):
        # the engine may fuse the sum into the convolution: rounding of the operands' size
        scale = max(np.abs(blobs[shortcut]).max(), np.abs(blobs[branch]).max())
        np.testing.assert_allclose(blobs[out], np.maximum(blobs[shortcut] + blobs[branch], 0),
                                   rtol=1e-5, atol=1e-5 * scale, err_msg=out)


@pytest.mark.parametrize("body, depth, blocks, last_stage4", [
    (ResNet101Body, 101, 3 + 4 + 23 + 3, "res4b22"),
    (ResNet152Body, 152, 3 + 8 + 36 + 3, "res4b35")])
def test_resnet_bodies_have_the_published_depth(body, depth, blocks, last_stage4):
    net = _input_net((1, 3, 224, 224))
    body(net, "data", use_pool5=True, use_dilation_conv5=True, use_global_stats=True)
    param = net.to_proto()
    types = [layer.type for layer in param.layer]
    assert types.count("Eltwise") == blocks
    assert types.count("Convolution") == 1 + 3 * blocks + 4        # 4 projection shortcuts
    assert 3 * blocks + 2 == depth                     # conv1, three per block, and the fc
    layers = {layer.name: layer for layer in param.layer}
    assert last_stage4 in layers and layers["pool5"].pooling_param.global_pooling
    # dilated conv5: stride 1, the 3x3 at dilation 2 and pad 2
    assert list(layers["res5a_branch1"].convolution_param.stride) == [1]
    branch2b = layers["res5a_branch2b"].convolution_param
    assert (list(branch2b.dilation), list(branch2b.pad)) == ([2], [2])
    assert layers["bn2a_branch2a"].batch_norm_param.use_global_stats
    assert [p.lr_mult for p in layers["scale2a_branch2a"].param] == [0, 0]


@pytest.mark.parametrize("build, size, top, shape", [
    (lambda n: VGGNetBody(n, "data", fully_conv=True, reduced=True, dilated=True), 64,
     "fc7", (1, 1024, 4, 4)),
    (lambda n: VGGNetBody(n, "data", nopool=True, need_fc=False), 32, "conv5_3", (1, 512, 2, 2)),
    (lambda n: ZFNetBody(n, "data", need_fc8=True), 96, "prob", (1, 1000)),
    (lambda n: ResNet101Body(n, "data"), 64, "pool5", (1, 2048, 1, 1)),
    (lambda n: InceptionV3Body(n, "data"), 75, "mixed_10/join", (1, 2048, 1, 1)),
], ids=["vgg_atrous", "vgg_nopool", "zf_fc8", "resnet101", "inception_v3"])
def test_bodies_build_and_run(tmp_path, build, size, top, shape):
    net = _input_net((1, 3, size, size))
    build(net)
    path = tmp_path / "body.prototxt"
    path.write_text(str(net.to_proto()))
    # TRAIN: BatchNorm uses batch statistics. In TEST the zero running statistics of an
    # untrained net scale by 1/sqrt(eps) per layer and overflow over ResNet-101's depth.
    run = caffe.Net(str(path), caffe.TRAIN)
    run.blobs["data"].data[...] = np.random.default_rng(2).normal(size=(1, 3, size, size))
    out = run.forward(blobs=[top])
    assert out[top].shape == shape and np.isfinite(out[top]).all()


def test_inception_v3_uses_bias_not_scale_and_asymmetric_kernels():
    net = _input_net((1, 3, 299, 299))
    InceptionV3Body(net, "data", output_pred=True)
    layers = {layer.name: layer for layer in net.to_proto().layer}
    assert "mixed_4/tower_1/conv_4_bias" in layers and not any(
        layer.type == "Scale" for layer in layers.values())
    conv = layers["mixed_4/tower/conv_1"].convolution_param
    assert (conv.kernel_h, conv.kernel_w, conv.pad_h, conv.pad_w) == (1, 7, 0, 3)
    assert list(layers["mixed_9/tower/mixed"].bottom) == ["mixed_9/tower/mixed/conv",
                                                          "mixed_9/tower/mixed/conv_1"]
    assert layers["softmax"].inner_product_param.num_output == 1008


def test_convbn_options():
    net = _input_net((1, 3, 8, 8))
    ConvBNLayer(net, "data", "c", use_bn=True, use_relu=False, num_output=4, kernel_size=3,
                pad=2, stride=1, dilation=2, use_scale=False, lr_mult=3, eps=1e-5)
    ConvBNLayer(net, "c", "d", use_bn=False, use_relu=True, num_output=4,
                kernel_size=[1, 5], pad=[0, 2], stride=1)
    layers = {layer.name: layer for layer in net.to_proto().layer}
    assert list(layers["c"].convolution_param.dilation) == [2]
    assert [p.lr_mult for p in layers["c"].param] == [3]
    assert layers["c_bn"].batch_norm_param.eps == pytest.approx(1e-5)
    assert [p.lr_mult for p in layers["c_bias"].param] == [3] and "c_scale" not in layers
    assert [(p.lr_mult, p.decay_mult) for p in layers["d"].param] == [(1, 1), (2, 0)]
    d = layers["d"].convolution_param
    assert (d.kernel_h, d.kernel_w, d.pad_h, d.pad_w, d.stride_h, d.stride_w) == (1, 5, 0, 2, 1, 1)
    assert "d_relu" in layers and "c_relu" not in layers


def test_mistakes_fail_with_the_reason():
    net = _input_net((1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"unknown batch-norm parameter\(s\) \['esp'\]"):
        ConvBNLayer(net, "data", "c", True, True, 4, 3, 1, 1, esp=1e-5)
    with pytest.raises(KeyError, match=r"no top 'conv9'.*tops: data"):
        ConvBNLayer(net, "conv9", "c", True, True, 4, 3, 1, 1)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        CreateMultiBoxHead(net, from_layers=["data"], min_sizes=[4])
    with pytest.raises(ValueError, match="aspect_ratios has 1 entries, from_layers 2"):
        CreateMultiBoxHead(net, num_classes=2, from_layers=["data", "data"], min_sizes=[4, 8],
                           aspect_ratios=[[2]])
    with pytest.raises(ValueError, match="expected one value or 2"):
        UnpackVariable([1, 2, 3], 2)
    assert UnpackVariable(3, 2) == [3, 3] and UnpackVariable([5], 2) == [5, 5]


def test_head_options_objectness_unshared_locations_and_image_size():
    net = _input_net((1, 3, 32, 48))
    ConvBNLayer(net, "data", "feat", False, True, 8, 3, 1, 2)
    loc, conf, priors, objectness = CreateMultiBoxHead(
        net, num_classes=3, from_layers=["feat"], min_sizes=[[8, 12]], max_sizes=[[16, 20]],
        aspect_ratios=[[2]], flip=False, share_location=False, use_objectness=True,
        inter_layer_depth=[6], img_height=32, img_width=48, use_batchnorm=True)
    layers = {layer.name: layer for layer in net.to_proto().layer}
    per_cell = (1 + 1 + 1) * 2                         # square, sqrt(min*max), ratio 2; 2 sizes
    assert layers["feat_inter_mbox_loc"].convolution_param.num_output == per_cell * 4 * 3
    assert layers["feat_inter_mbox_objectness"].convolution_param.num_output == per_cell * 2
    prior = layers["feat_inter_mbox_priorbox"].prior_box_param
    assert (prior.img_h, prior.img_w, prior.HasField("flip"), prior.flip) == (32, 48, True, False)
    assert "feat_inter_bn" in layers and layers["mbox_objectness"].concat_param.axis == 1
