"""Bring old network definitions up to today's NetParameter, as Caffe's upgrade step does.

Handled: V1 ``layers {}`` with enum types (model-zoo files such as VGG16 ILSVRC),
deploy-style ``input:``/``input_dim:``/``input_shape`` (become an Input layer), data-layer
transformation fields that moved into ``transform_param``, and BatchNorm nets that list
three ``param {}`` entries (dropped: the layer pins its statistics to lr_mult 0 itself).
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import logging

from caffe_compat.proto import caffe_pb2

log = logging.getLogger(__name__)

# V1LayerParameter.LayerType enum name -> layer type string.
_V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V1 fields that are not copied by name into LayerParameter.
_V1_SPECIAL = {"type", "param", "blob_share_mode", "blobs_lr", "weight_decay", "layer"}

# Data-layer parameter messages whose scale/mean_file/crop_size/mirror moved to transform_param.
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
_DATA_PARAMS = ("data_param", "image_data_param", "window_data_param")


class UpgradeError(CaffeCompatError):
    pass


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Return ``net`` in current form (the argument is upgraded in place and returned)."""
    if net.layers:
        if net.layer:
            raise UpgradeError(f"{source}: uses both 'layer' and the deprecated 'layers'; "
                               "use only 'layer'")
        _upgrade_v1_layers(net, source)
    _upgrade_inputs(net, source)
    for layer in net.layer:
        _upgrade_transform(layer)
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            del layer.param[:]
    return net


def _upgrade_v1_layers(net: caffe_pb2.NetParameter, source: str) -> None:
    log.info("%s: upgrading V1 'layers' definitions", source)
    new_layers = [v1_to_layer(v1, source) for v1 in net.layers]
    del net.layers[:]
    net.layer.extend(new_layers)


def v1_to_layer(v1: caffe_pb2.V1LayerParameter, source: str = "<net>") -> caffe_pb2.LayerParameter:
    """Convert one V1LayerParameter (enum type, blobs_lr, weight_decay) to a LayerParameter."""
    if v1.HasField("layer"):
        raise UpgradeError(f"{source}: layer '{v1.name}' is a V0 definition; "
                           "V0 nets are not supported (upgrade with an old Caffe first)")
    layer = caffe_pb2.LayerParameter()
    type_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    if type_name not in _V1_TYPES:
        raise UpgradeError(f"{source}: layer '{v1.name}' has unknown V1 type {type_name}")
    layer.type = _V1_TYPES[type_name]
    for field, value in v1.ListFields():
        if field.name in _V1_SPECIAL:
            continue
        target = layer.DESCRIPTOR.fields_by_name.get(field.name)
        if target is None:
            raise UpgradeError(f"{source}: layer '{v1.name}': V1 field '{field.name}' has no "
                               "current equivalent")
        if field.is_repeated:
            getattr(layer, field.name).extend(value)
        elif field.message_type is not None:
            getattr(layer, field.name).CopyFrom(value)
        else:
            setattr(layer, field.name, value)
    n_specs = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay), len(v1.blob_share_mode))
    for i in range(n_specs):
        spec = layer.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    return layer


def _upgrade_inputs(net: caffe_pb2.NetParameter, source: str) -> None:
    """Deploy-style ``input``/``input_dim``/``input_shape`` fields become a leading Input layer."""
    if not net.input:
        if net.input_dim or net.input_shape:
            raise UpgradeError(f"{source}: input_dim/input_shape given without 'input' names")
        return
    n = len(net.input)
    if net.input_shape:
        if len(net.input_shape) != n:
            raise UpgradeError(f"{source}: {n} 'input' names but {len(net.input_shape)} "
                               "input_shape entries")
        shapes = [list(s.dim) for s in net.input_shape]
    elif net.input_dim:
        if len(net.input_dim) != 4 * n:
            raise UpgradeError(f"{source}: {n} 'input' names need {4 * n} input_dim values, "
                               f"got {len(net.input_dim)}")
        dims = list(net.input_dim)
        shapes = [dims[4 * i:4 * i + 4] for i in range(n)]
    else:
        raise UpgradeError(f"{source}: 'input' given without input_shape or input_dim")
    layer = caffe_pb2.LayerParameter(name="input", type="Input", top=list(net.input))
    for shape in shapes:
        layer.input_param.shape.add().dim.extend(shape)
    existing = list(net.layer)
    del net.layer[:]
    net.layer.extend([layer] + existing)
    del net.input[:]
    del net.input_dim[:]
    del net.input_shape[:]


def _upgrade_transform(layer: caffe_pb2.LayerParameter) -> None:
    """Old data layers kept scale/mean_file/crop_size/mirror in their own params."""
    for name in _DATA_PARAMS:
        if not layer.HasField(name):
            continue
        sub = getattr(layer, name)
        for field in _TRANSFORM_FIELDS:
            if sub.HasField(field):
                setattr(layer.transform_param, field, getattr(sub, field))
                sub.ClearField(field)
