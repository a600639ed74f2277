"""What the popular Caffe forks define that this project does not implement.

Used to explain errors: a prototxt field or layer type listed here is reported as "defined by
<fork>, not supported", anything else as defined by no supported fork. The fork layers this
project does implement are in caffe.proto and the layer registry (docs/forks.md); this file
lists only the ones still missing, so it never claims support that is absent.
"""
from __future__ import annotations

import re

_SSD = "weiliu89/caffe (SSD)"
_YOLO = "the YOLO ports of Caffe"
_MOBILENET_YOLO = "eric612/MobileNet-YOLO"
_SYNOPSYS = "foss-for-synopsys-dwc-arc-processors/synopsys-caffe"
# Other YOLOv2 ports' Region layers, incompatible with the one implemented (docs/forks.md).
_OTHER_REGION = ("another YOLOv2 port's Region layer (BirdeeChen/caffe_yolo_v2, "
                 "sokeeffe/caffe_yolo, Cambricon Caffe), incompatible with the "
                 "openvinotoolkit/training_toolbox_caffe Region this project implements")
_DEEPLAB = "DeepLab v2 caffe (deeplab-public-ver2; also hszhao/PSPNet)"
# colorization's train_val_v2.prototxt names this loss; the fork's source could not be read
_COLORIZATION = "richzhang/colorization's Caffe fork (the colorization training loss)"
# FocalLoss here is zimenglan-sysu-512/Focal-Loss' (type, gamma, alpha, beta); these forks'
# focal_loss_param fields clash with it (chuanqi305's numbers engine and axis 1 and 2, its
# type and gamma; owphoo's alpha is repeated, one per class).
_CHUANQI_FOCAL = ("chuanqi305/FocalLoss' focal_loss_param (the FocalLoss here is "
                  "zimenglan-sysu-512/Focal-Loss', the same loss: set the axis with "
                  "softmax_param.axis)")
_OWPHOO_FOCAL = ("owphoo/FocalLoss' per-class alphas (the FocalLoss here is "
                 "zimenglan-sysu-512/Focal-Loss', with one alpha for all classes)")

# Fields, by message, that forks add and caffe.proto lacks. "LayerParameter" holds the layer
# parameter blocks; the others are fields nested inside BVLC's (or a fork's) messages, so a
# fork's prototxt is told apart from a typo at any depth.
FORK_FIELDS: dict[str, dict[str, str]] = {
    "LayerParameter": {
        "yolo_v3_loss_param": _SYNOPSYS, "yolov3_param": _MOBILENET_YOLO,
        "region_loss_param": _YOLO, "yolo_detection_output_param": _MOBILENET_YOLO,
        "dense_crf_param": _DEEPLAB,
    },
    "RegionParameter": {name: _OTHER_REGION for name in
                        ("boxes_of_each_grid", "softmax", "bias_match", "output_square", "ratio",
                         "iou_thresh", "box_thresh", "anchors", "side", "num_classes", "biases",
                         "thresh", "jitter", "object_scale", "class_scale", "noobject_scale",
                         "coord_scale", "nms_threshold", "iou_threshold")},
    "FocalLossParameter": {"engine": _CHUANQI_FOCAL, "axis": _CHUANQI_FOCAL,
                           "alpha_balance": _OWPHOO_FOCAL},
}

# Layer types that forks register and this project lacks.
FORK_TYPES: dict[str, str] = {
    "Yolov3": _MOBILENET_YOLO,
    "RegionLoss": _YOLO,
    "YoloDetectionOutput": _MOBILENET_YOLO,
    "DenseCRF": _DEEPLAB,
    "SoftmaxCrossEntropyLoss": _COLORIZATION,
}

_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')


def explain_unknown_field(reason: str) -> tuple[str, str, str] | None:
    """For protobuf's "has no field named" reason: (message type, field, who defines it)."""
    match = _NO_FIELD.search(reason)
    if match is None:
        return None
    message, field = match.group(1), match.group(2)
    fork = FORK_FIELDS.get(message.rsplit(".", 1)[-1], {}).get(field)
    origin = (f"defined by {fork}, which this project does not implement" if fork
              else "no supported fork defines it")
    return message, field, origin


def enclosing_layer(text: str, line: int, column: int | None = None) -> str | None:
    """The ``name`` of the ``layer``/``layers`` block open at 1-based ``line``/``column``."""
    lines = text.splitlines()[:line]
    if lines and column is not None:
        lines[-1] = lines[-1][:max(column - 1, 0)]
    depth_stack: list[int] = []          # brace depths of the open layer blocks
    depth = 0
    names: dict[int, str] = {}
    prefix = "\n".join(lines)
    for match in re.finditer(r'\blayers?\s*\{|[{}]|\bname\s*:\s*(?:"([^"]*)"|\'([^\']*)\')',
                             prefix):
        token = match.group(0)
        if token.startswith("layer"):
            depth += 1
            depth_stack.append(depth)
        elif token == "{":
            depth += 1
        elif token == "}":
            if depth_stack and depth_stack[-1] == depth:
                names.pop(depth_stack.pop(), None)
            depth -= 1
        elif depth_stack and depth == depth_stack[-1]:
            names[depth] = match.group(1) if match.group(1) is not None else match.group(2)
    for open_depth in reversed(depth_stack):
        if open_depth in names:
            return names[open_depth]
    return "(unnamed)" if depth_stack else None
