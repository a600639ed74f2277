"""Small scripts in the style of other repositories' pycaffe code, run unchanged with
``import caffe``: an SSD-style NetSpec builder and label-map lookup, a MobileNet-SSD-style
merge of BatchNorm/Scale into convolutions over ``caffe._caffe.BlobVec``, a
py-faster-rcnn-style Python layer, Bayesian SegNet's Monte-Carlo test, and a GPU script on
a machine without CUDA. (Our own code, written after reading what those scripts call.)"""
from __future__ import annotations

import logging
import textwrap

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2


# -- SSD: NetSpec builders that set SSD's messages, and a label map ---------------------
def _ssd_train_head(net, source: str, label_map: str):
    """The shape of SSD's data / loss definitions: AnnotatedData with batch samplers and
    augmentation, MultiBoxLoss with its matching and mining settings."""
    samplers = [{"sampler": {}, "max_trials": 1, "max_sample": 1}]
    for overlap in (0.1, 0.3, 0.5):
        samplers.append({"sampler": {"min_scale": 0.3, "max_scale": 1.0,
                                     "min_aspect_ratio": 0.5, "max_aspect_ratio": 2.0},
                         "sample_constraint": {"min_jaccard_overlap": overlap},
                         "max_trials": 50, "max_sample": 1})
    transform = {"mirror": True, "mean_value": [104, 117, 123],
                 "resize_param": {"prob": 1, "resize_mode": P.Resize.WARP, "height": 300,
                                  "width": 300, "interp_mode": [P.Resize.LINEAR, P.Resize.AREA]},
                 "emit_constraint": {"emit_type": caffe_pb2.EmitConstraint.CENTER},
                 "distort_param": {"brightness_prob": 0.5, "brightness_delta": 32,
                                   "contrast_prob": 0.5, "contrast_lower": 0.5,
                                   "contrast_upper": 1.5},
                 "expand_param": {"prob": 0.5, "max_expand_ratio": 4.0}}
    net.data, net.label = L.AnnotatedData(
        name="data", include={"phase": caffe.TRAIN}, transform_param=transform,
        data_param={"source": source, "batch_size": 32, "backend": P.Data.LMDB},
        annotated_data_param={"batch_sampler": samplers, "label_map_file": label_map},
        ntop=2)
    net.mbox_loss = L.MultiBoxLoss(
        net.data, net.label, include={"phase": caffe.TRAIN}, propagate_down=[True, False],
        multibox_loss_param={"loc_loss_type": P.MultiBoxLoss.SMOOTH_L1,
                             "conf_loss_type": P.MultiBoxLoss.SOFTMAX, "loc_weight": 1.0,
                             "num_classes": 21, "share_location": True,
                             "match_type": P.MultiBoxLoss.PER_PREDICTION,
                             "overlap_threshold": 0.5, "use_prior_for_matching": True,
                             "background_label_id": 0, "use_difficult_gt": True,
                             "mining_type": P.MultiBoxLoss.MAX_NEGATIVE, "neg_pos_ratio": 3.0,
                             "neg_overlap": 0.5, "code_type": P.PriorBox.CENTER_SIZE,
                             "ignore_cross_boundary_bbox": False},
        loss_param={"normalization": P.Loss.VALID})
    return net


def test_ssd_style_netspec_writes_and_reparses_every_field(tmp_path):
    spec = _ssd_train_head(caffe.NetSpec(), "trainval_lmdb", "labelmap_voc.prototxt")
    text = str(spec.to_proto())
    assert "batch_sampler" in text and "max_expand_ratio: 4" in text
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    data, loss = net.layer
    assert [s.sample_constraint.min_jaccard_overlap for s in
            data.annotated_data_param.batch_sampler[1:]] == pytest.approx([0.1, 0.3, 0.5])
    assert data.transform_param.resize_param.interp_mode == [caffe_pb2.ResizeParameter.LINEAR,
                                                              caffe_pb2.ResizeParameter.AREA]
    assert data.transform_param.distort_param.contrast_upper == pytest.approx(1.5)
    assert loss.multibox_loss_param.code_type == caffe_pb2.PriorBoxParameter.CENTER_SIZE
    assert loss.multibox_loss_param.mining_type == caffe_pb2.MultiBoxLossParameter.MAX_NEGATIVE
    solver = caffe_pb2.SolverParameter(eval_type="detection", ap_version="11point",
                                       show_per_class_result=True)
    assert text_format.Parse(text_format.MessageToString(solver),
                             caffe_pb2.SolverParameter()).ap_version == "11point"


def test_ssd_plateau_policy_is_named_not_guessed():
    from caffe_compat.engine.solver.lr_policy import LRPolicyError, learning_rate
    param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="plateau", plateau_winsize=[100])
    with pytest.raises(LRPolicyError, match=r"'plateau' is weiliu89/caffe's \(SSD\)"):
        learning_rate(param, 0, 0)


def test_building_ssd_training_layers_reaches_the_data_source(tmp_path):
    """The layers parse, and building the net builds AnnotatedData, which names its
    missing database."""
    path = tmp_path / "train.prototxt"
    path.write_text(str(_ssd_train_head(caffe.NetSpec(), "lmdb", "map.prototxt").to_proto()))
    with pytest.raises(Exception, match=r"layer 'data' \(AnnotatedData\): lmdb: database "
                                        r"does not exist"):
        caffe.Net(str(path), caffe.TRAIN)


LABELMAP = """
item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "aeroplane" label: 1 display_name: "aeroplane" }
item { name: "pottedplant" label: 16 display_name: "pottedplant" }
"""


def _display_names(labelmap, labels):
    """ssd_detect-style lookup: the display name of each label (or 'Unknown')."""
    names = []
    for label in labels:
        hit = [item.display_name for item in labelmap.item if item.label == label]
        names.append(hit[0] if hit else "Unknown")
    return names


def test_ssd_style_label_map_lookup(tmp_path):
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    labelmap = caffe_pb2.LabelMap()
    with open(tmp_path / "labelmap.prototxt") as f:
        text_format.Merge(str(f.read()), labelmap)
    assert _display_names(labelmap, [16, 1, 7]) == ["pottedplant", "aeroplane", "Unknown"]


# -- MobileNet-SSD-style merge of BatchNorm + Scale into the convolution ----------------
BN_NET = """
name: "bn"
input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_term: false } }
%s
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
"""
BN_LAYERS = """
layer { name: "conv1/bn" type: "BatchNorm" bottom: "conv1" top: "conv1"
        batch_norm_param { use_global_stats: true eps: 1e-5 } }
layer { name: "conv1/scale" type: "Scale" bottom: "conv1" top: "conv1"
        scale_param { bias_term: true } }
"""
MERGED = BN_NET.replace("bias_term: false", "bias_term: true") % ""


def _merge(net, merged):
    """Fold each conv's BatchNorm/Scale into its weights, as merge_bn scripts do."""
    for key in net.params.keys():
        if type(net.params[key]) is not caffe._caffe.BlobVec:
            continue
        if key.endswith("/bn") or key.endswith("/scale"):
            continue
        conv = net.params[key]
        if key + "/bn" not in net.params:
            for i, w in enumerate(conv):
                merged.params[key][i].data[...] = w.data
            continue
        bn, scale = net.params[key + "/bn"], net.params[key + "/scale"]
        w = conv[0].data
        bias = conv[1].data if len(conv) > 1 else np.zeros(w.shape[0])
        factor = bn[2].data[0]
        factor = 1.0 / factor if factor != 0 else 0.0
        mean, var = bn[0].data * factor, bn[1].data * factor
        rstd = 1.0 / np.sqrt(var + 1e-5)
        merged.params[key][0].data[...] = w * (rstd * scale[0].data).reshape(-1, 1, 1, 1)
        merged.params[key][1].data[...] = (bias - mean) * rstd * scale[0].data + scale[1].data


def test_merge_bn_over_blobvec_keeps_the_outputs(tmp_path):
    (tmp_path / "train.prototxt").write_text(BN_NET % BN_LAYERS)
    (tmp_path / "deploy.prototxt").write_text(MERGED)
    net = caffe.Net(str(tmp_path / "train.prototxt"), caffe.TEST)
    rng = np.random.default_rng(0)
    bn = net.params["conv1/bn"]
    bn[0].data[...] = rng.normal(size=4) * 4
    bn[1].data[...] = rng.uniform(0.5, 2.0, 4) * 4
    bn[2].data[...] = 4.0                              # Caffe's moving-average factor
    net.params["conv1/scale"][0].data[...] = rng.uniform(0.5, 1.5, 4)
    net.params["conv1/scale"][1].data[...] = rng.normal(size=4)
    assert type(net.params["conv1"]) is caffe._caffe.BlobVec and len(net.params["conv1"]) == 1
    assert type(net.layers) is caffe._caffe.LayerVec
    merged = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST)
    _merge(net, merged)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    want = net.forward(data=x)["conv1"].copy()
    np.testing.assert_allclose(merged.forward(data=x)["conv1"], want, rtol=1e-4, atol=1e-5)
    merged.save(str(tmp_path / "merged.caffemodel"))
    again = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "merged.caffemodel"),
                      caffe.TEST)
    np.testing.assert_allclose(again.forward(data=x)["conv1"], want, rtol=1e-4, atol=1e-5)


# -- py-faster-rcnn-style Python layer: param_str_ and str(self.phase) -----------------
FRCNN_LAYER = '''
import json
import numpy as np
import caffe

SETTINGS = {"TRAIN": {"keep": 3}, "TEST": {"keep": 2}}


class TopScoresLayer(caffe.Layer):
    """Keeps the best-scoring rows; how many depends on the phase's settings."""

    def setup(self, bottom, top):
        layer_params = json.loads(self.param_str_)
        self._scale = layer_params["scale"]
        cfg_key = str(self.phase)            # 'TRAIN' or 'TEST'
        self._keep = SETTINGS[cfg_key]["keep"]
        self._training = self.phase == caffe.TRAIN
        top[0].reshape(self._keep, bottom[0].data.shape[1])

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        order = np.argsort(-bottom[0].data[:, 0])[:self._keep]
        top[0].data[...] = bottom[0].data[order] * self._scale

    def backward(self, top, propagate_down, bottom):
        pass

    def set_roidb(self, roidb):
        """Called on net.layers[i] by the training script, as py-faster-rcnn's trainer does."""
        self._roidb = roidb
'''


@pytest.mark.parametrize("phase, keep", [(caffe.TRAIN, 3), (caffe.TEST, 2)])
def test_fast_rcnn_style_python_layer(tmp_path, monkeypatch, phase, keep):
    (tmp_path / "frcnn_layers.py").write_text(textwrap.dedent(FRCNN_LAYER))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "net.prototxt").write_text(
        'input: "scores" input_shape { dim: 5 dim: 2 }\n'
        'layer { name: "top" type: "Python" bottom: "scores" top: "best"\n'
        '  python_param { module: "frcnn_layers" layer: "TopScoresLayer" '
        "param_str: '{\"scale\": 2.0}' } }\n")
    net = caffe.Net(str(tmp_path / "net.prototxt"), phase)
    scores = np.array([[0.1, 1], [0.9, 2], [0.5, 3], [0.7, 4], [0.2, 5]], np.float32)
    out = net.forward(scores=scores)["best"]
    np.testing.assert_array_equal(out, scores[[1, 3, 2][:keep]] * 2)
    layer = net.layer_dict["top"].layer.py
    assert layer.param_str == layer.param_str_ and layer.phase == phase
    net.layers[list(net._layer_names).index("top")].set_roidb(["image-1"])
    assert layer._roidb == ["image-1"]
    assert repr(layer.phase) == ("TRAIN", "TEST")[phase] and type(layer.phase) is caffe._caffe.Phase


# -- Bayesian SegNet: Monte-Carlo dropout at test ---------------------------------------
def test_bayesian_segnet_style_mc_sampling(tmp_path):
    (tmp_path / "net.prototxt").write_text(
        'input: "data" input_shape { dim: 8 dim: 3 dim: 4 dim: 4 }\n'
        'layer { name: "drop" type: "Dropout" bottom: "data" top: "drop"\n'
        '  dropout_param { dropout_ratio: 0.5 sample_weights_test: true } }\n'
        'layer { name: "score" type: "Convolution" bottom: "drop" top: "score"\n'
        '  convolution_param { num_output: 2 kernel_size: 1 weight_filler { type: "xavier" } } }\n'
        'layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }\n')
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    image = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    batch = np.repeat(image[None], net.blobs["data"].data.shape[0], axis=0)   # one image, N draws
    net.forward_all(data=batch)
    predicted = net.blobs["prob"].data
    uncertainty = np.var(predicted, axis=0)
    assert uncertainty.max() > 1e-4                    # the samples differ: dropout ran at TEST
    assert np.argmax(np.mean(predicted, axis=0), axis=0).shape == (4, 4)


# -- GPU scripts on a CPU machine -------------------------------------------------------
def test_set_mode_gpu_without_cuda_keeps_the_error_unless_told(monkeypatch, caplog):
    from caffe_compat.engine import mode
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CAFFE_COMPAT_GPU_FALLBACK", raising=False)
    with pytest.raises(RuntimeError, match="CAFFE_COMPAT_GPU_FALLBACK=cpu"):
        caffe.set_mode_gpu()
    monkeypatch.setenv("CAFFE_COMPAT_GPU_FALLBACK", "cpu")
    monkeypatch.setattr(mode, "_fallback_told", False)
    with caplog.at_level(logging.WARNING):
        caffe.set_device(0)
        caffe.set_mode_gpu()
        caffe.set_mode_gpu()
    told = [r for r in caplog.records if "computing on the CPU" in r.getMessage()]
    assert len(told) == 1 and mode.device().type == "cpu"
    caffe.set_mode_cpu()
