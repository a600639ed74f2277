"""The benchmark's small deployed nets: our own nets of the shapes people deploy from Caffe.

    python benchmarks/nets/generate.py          # writes these too

LeNet (MNIST 28x28), MTCNN-like P/R/O-Nets (PReLU after every convolution, Caffe's ceil-mode
pooling, two or three heads; P-Net at one 120x160 pyramid level), a depthwise-separable face
detector of UltraFace slim-320's shape (240x320, BatchNorm + ReLU, four box heads, Permute +
Reshape + Concat, Softmax scores, no post-processing layer) and an SSD face detector with
PriorBox heads and a DetectionOutput (libfacedetection's layout, 240x320). The weights are
the fillers' random values; only the shapes matter for speed.
"""
from __future__ import annotations


def prelu(n, name, blob):
    n.add(f'name: "{name}" type: "PReLU" bottom: "{blob}" top: "{blob}"')
    return blob


def softmax(n, name, bottom, axis=1):
    n.add(f'name: "{name}" type: "Softmax" bottom: "{bottom}" top: "{name}" '
          f'softmax_param {{ axis: {axis} }}')
    return name


def lenet(Net):
    n = Net("LeNet", 28, channels=1)
    x = n.pool("pool1", n.conv("conv1", "data", 20, 5), "MAX", 2, 2)
    x = n.pool("pool2", n.conv("conv2", x, 50, 5), "MAX", 2, 2)
    x = n.relu("relu1", n.fc("ip1", x, 500))
    n.softmax(n.fc("ip2", x, 10))
    return n


def mtcnn_pnet(Net):
    n = Net("PNet", (120, 160))
    x = n.pool("pool1", prelu(n, "PReLU1", n.conv("conv1", "data", 10, 3)), "MAX", 2, 2)
    x = prelu(n, "PReLU2", n.conv("conv2", x, 16, 3))
    x = prelu(n, "PReLU3", n.conv("conv3", x, 32, 3))
    softmax(n, "prob1", n.conv("conv4-1", x, 2, 1))
    n.conv("conv4-2", x, 4, 1)
    return n


def mtcnn_rnet(Net):
    n = Net("RNet", 24)
    x = n.pool("pool1", prelu(n, "prelu1", n.conv("conv1", "data", 28, 3)), "MAX", 3, 2)
    x = n.pool("pool2", prelu(n, "prelu2", n.conv("conv2", x, 48, 3)), "MAX", 3, 2)
    x = prelu(n, "prelu3", n.conv("conv3", x, 64, 2))
    x = prelu(n, "prelu4", n.fc("conv4", x, 128))
    softmax(n, "prob1", n.fc("conv5-1", x, 2))
    n.fc("conv5-2", x, 4)
    return n


def mtcnn_onet(Net):
    n = Net("ONet", 48)
    x = n.pool("pool1", prelu(n, "prelu1", n.conv("conv1", "data", 32, 3)), "MAX", 3, 2)
    x = n.pool("pool2", prelu(n, "prelu2", n.conv("conv2", x, 64, 3)), "MAX", 3, 2)
    x = n.pool("pool3", prelu(n, "prelu3", n.conv("conv3", x, 64, 3)), "MAX", 2, 2)
    x = prelu(n, "prelu4", n.conv("conv4", x, 128, 2))
    x = prelu(n, "prelu5", n.fc("conv5", x, 256))
    softmax(n, "prob1", n.fc("conv6-1", x, 2))
    n.fc("conv6-2", x, 4)
    n.fc("conv6-3", x, 10)
    return n


def _conv_bn(n, name, x, out, stride=1, k=3, group=1):
    x = n.conv(name, x, out, k, s=stride, p=k // 2, group=group, bias=False)
    return n.relu(name + "/relu", n.bn_scale(name + "/bn", name + "/scale", x))


def _dw(n, name, x, cin, out, stride=1):
    x = _conv_bn(n, name + "/dw", x, cin, stride, group=cin)
    return _conv_bn(n, name + "/sep", x, out, k=1)


def _flat_head(n, name, x, channels, width):
    """A box head: 3x3 convolution, NCHW -> NHWC, rows of ``width`` values."""
    x = n.conv(name, x, channels, 3, p=1)
    n.add(f'name: "{name}_perm" type: "Permute" bottom: "{x}" top: "{name}_perm" '
          'permute_param { order: 0 order: 2 order: 3 order: 1 }')
    n.add(f'name: "{name}_flat" type: "Reshape" bottom: "{name}_perm" top: "{name}_flat" '
          f'reshape_param {{ shape {{ dim: 0 dim: -1 dim: {width} }} }}')
    return f"{name}_flat"


def ultraface_slim(Net):
    n = Net("UltraFace-slim-320", (240, 320))
    x = _conv_bn(n, "conv0", "data", 16, 2)
    plan = [(16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 1), (64, 128, 2),
            (128, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 1)]
    feeds = {4: 3, 7: 2, 9: 2}
    scores, boxes = [], []
    for i, (cin, out, s) in enumerate(plan, start=1):
        x = _dw(n, f"conv{i}", x, cin, out, s)
        if i in feeds:
            scores.append(_flat_head(n, f"cls{i}", x, feeds[i] * 2, 2))
            boxes.append(_flat_head(n, f"reg{i}", x, feeds[i] * 4, 4))
    scores.append(_flat_head(n, "cls_last", x, 3 * 2, 2))
    boxes.append(_flat_head(n, "reg_last", x, 3 * 4, 4))
    n.add('name: "cls" type: "Concat" ' + " ".join(f'bottom: "{b}"' for b in scores)
          + ' top: "cls" concat_param { axis: 1 }')
    n.add('name: "boxes" type: "Concat" ' + " ".join(f'bottom: "{b}"' for b in boxes)
          + ' top: "boxes" concat_param { axis: 1 }')
    softmax(n, "scores", "cls", axis=2)
    return n


def _ssd_head(n, name, x, priors, min_sizes, step):
    loc = n.conv(name + "_loc", x, priors * 4, 3, p=1)
    conf = n.conv(name + "_conf", x, priors * 2, 3, p=1)
    flat = []
    for blob in (loc, conf):
        n.add(f'name: "{blob}_perm" type: "Permute" bottom: "{blob}" top: "{blob}_perm" '
              'permute_param { order: 0 order: 2 order: 3 order: 1 }')
        n.add(f'name: "{blob}_flat" type: "Flatten" bottom: "{blob}_perm" top: "{blob}_flat" '
              'flatten_param { axis: 1 }')
        flat.append(f"{blob}_flat")
    sizes = " ".join(f"min_size: {s}" for s in min_sizes)
    n.add(f'name: "{name}_priorbox" type: "PriorBox" bottom: "{x}" bottom: "data" '
          f'top: "{name}_priorbox" prior_box_param {{ {sizes} clip: false variance: 0.1 '
          f'variance: 0.1 variance: 0.2 variance: 0.2 step: {step} offset: 0.5 }}')
    return flat[0], flat[1], f"{name}_priorbox"


def ssd_face(Net):
    n = Net("SSD-face-320", (240, 320))
    x = n.relu("conv1_relu", n.conv("conv1", "data", 32, 3, s=2, p=1))
    x = n.relu("conv2_relu", n.conv("conv2", x, 32, 3, p=1))
    x = n.pool("pool2", x, "MAX", 2, 2)
    heads = []
    for stage, (out, sizes) in enumerate(((64, (10, 16, 24)), (128, (32, 48)),
                                          (128, (64, 96)), (256, (128, 192, 256))), start=3):
        x = n.relu(f"conv{stage}_1_relu", n.conv(f"conv{stage}_1", x, out, 3, p=1))
        x = n.relu(f"conv{stage}_2_relu", n.conv(f"conv{stage}_2", x, out, 3, p=1))
        heads.append(_ssd_head(n, f"conv{stage}", x, len(sizes), sizes, 2 ** (stage - 1)))
        if stage < 6:
            x = n.pool(f"pool{stage}", x, "MAX", 2, 2)
    for i, (name, axis) in enumerate((("mbox_loc", 1), ("mbox_conf", 1), ("mbox_priorbox", 2))):
        n.add(f'name: "{name}" type: "Concat" ' + " ".join(f'bottom: "{h[i]}"' for h in heads)
              + f' top: "{name}" concat_param {{ axis: {axis} }}')
    n.add('name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" '
          'top: "mbox_conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }')
    softmax(n, "mbox_conf_softmax", "mbox_conf_reshape", axis=2)
    n.add('name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" '
          'top: "mbox_conf_flatten" flatten_param { axis: 1 }')
    n.add('name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" '
          'bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_out" '
          'detection_output_param { num_classes: 2 share_location: true '
          'background_label_id: 0 nms_param { nms_threshold: 0.3 top_k: 400 } '
          'code_type: CENTER_SIZE keep_top_k: 100 confidence_threshold: 0.3 }')
    return n


SMALL_NETS = {"lenet": lenet, "mtcnn_pnet": mtcnn_pnet, "mtcnn_rnet": mtcnn_rnet,
              "mtcnn_onet": mtcnn_onet, "ultraface_slim": ultraface_slim, "ssd_face": ssd_face}
