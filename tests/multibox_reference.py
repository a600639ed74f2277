"""An independent float64 reference of SSD's MultiBoxLoss (shared locations), written from
the fork's definitions with plain loops, and the fixtures the MultiBoxLoss tests share: six
priors, two images of boxes (a difficult one, padding rows), layer and input builders, and
the prototxt of a tiny two-source SSD (train and deploy)."""
from __future__ import annotations

import numpy as np
import torch
from google.protobuf import text_format

from caffe_compat.engine.layers.base import layer_class
from caffe_compat.proto import caffe_pb2

PRIORS = np.array([[0.0, 0.0, 0.4, 0.4], [0.3, 0.0, 0.7, 0.4], [0.6, 0.0, 1.0, 0.4],
                   [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5]])
VARIANCE = [0.1, 0.1, 0.2, 0.2]
# [item, label, instance, xmin, ymin, xmax, ymax, difficult]; image 1 has a difficult box
# exactly on prior 3 and padding rows.
ROWS = [[0, 1, 0, 0.04, 0.04, 0.44, 0.44, 0], [0, 2, 0, 0.55, 0.55, 0.95, 1.0, 0],
        [-1, -1, -1, -1, -1, -1, -1, -1], [1, 1, 0, 0.3, 0.05, 0.72, 0.42, 0],
        [1, 2, 0, 0.0, 0.5, 0.5, 1.0, 1], [-1, -1, -1, -1, -1, -1, -1, -1]]
C = 3


# -- the reference ------------------------------------------------------------------------
def iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return w * h / (area(a) + area(b) - w * h)


def match(priors, gts, per_prediction, threshold):
    """Bipartite (best remaining pair first), then each free prior's best gt >= threshold."""
    o = np.array([[iou(p, g) for g in gts] for p in priors]).reshape(len(priors), len(gts))
    m, pool = [-1] * len(priors), list(range(len(gts)))
    while pool:
        pairs = [(o[i, j], -i, -j) for i in range(len(priors)) if m[i] == -1 for j in pool
                 if o[i, j] > 1e-6]
        if not pairs:
            break
        _, i, j = max(pairs)
        m[-i] = -j
        pool.remove(-j)
    for i in range(len(priors)):
        if per_prediction and m[i] == -1 and o[i].max(initial=0) >= threshold:
            m[i] = int(np.argmax(o[i]))
    return np.array(m), o.max(axis=1, initial=0)


def encode(g, p, v, code):
    pw, ph = p[2] - p[0], p[3] - p[1]
    if code == "CORNER":
        return (g - p) / v
    if code == "CORNER_SIZE":
        return (g - p) / np.array([pw, ph, pw, ph]) / v
    gw, gh = g[2] - g[0], g[3] - g[1]
    centre_x = ((g[0] + g[2]) - (p[0] + p[2])) / 2 / pw
    centre_y = ((g[1] + g[3]) - (p[1] + p[3])) / 2 / ph
    return np.array([centre_x, centre_y, np.log(gw / pw), np.log(gh / ph)]) / v


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def softmax_row(x, label):
    prob = softmax(x)
    return -np.log(prob[label]), prob - np.eye(len(x))[label]


def logistic_row(x, label):
    sig, t = 1 / (1 + np.exp(-x)), np.eye(len(x))[label]
    return -(t * np.log(sig) + (1 - t) * np.log(1 - sig)).sum(), sig - t


def reference(loc, conf, gts, o, priors=PRIORS, row=softmax_row):
    """(loss, dloss/dloc, dloss/dconf, matches) with shared locations."""
    n = len(loc)
    loc, conf = loc.reshape(n, -1, 4), conf.reshape(n, -1, C)
    dloc, dconf = np.zeros_like(loc), np.zeros_like(conf)
    loc_sum = conf_sum = 0.0
    matches, count = [], 0
    for i in range(n):
        boxes = [g for g in gts if g[0] == i]
        if not boxes:
            matches.append(None)
            continue
        m, best = match(priors, [g[1] for g in boxes], o["per_prediction"], 0.5)
        matches.append(m)
        rows = []
        for j in np.flatnonzero(m > -1):
            d = loc[i, j] - encode(np.array(boxes[m[j]][1]), priors[j], np.array(VARIANCE),
                                   o["code"])
            if o["l2"]:
                loc_sum += (0.5 * d * d).sum()
                dloc[i, j] = o["loc_weight"] * d
            else:
                loc_sum += np.where(abs(d) < 1, 0.5 * d * d, abs(d) - 0.5).sum()
                dloc[i, j] = o["loc_weight"] * np.where(abs(d) < 1, d, np.sign(d))
            rows.append((j, boxes[m[j]][2]))
        count += len(rows)
        free = [j for j in range(len(priors)) if m[j] == -1 and best[j] < o["neg_overlap"]]
        if o["mining"]:
            free.sort(key=lambda j: -row(conf[i, j], 0)[0])
            free = free[:int(len(rows) * o["ratio"])]
        else:
            free = [j for j in range(len(priors)) if m[j] == -1]
        for j, label in rows + [(j, 0) for j in free]:
            value, grad = row(conf[i, j], label)
            conf_sum += value
            dconf[i, j] = grad
    if not o["mining"]:   # every prior of every image counts, background by default
        for i in range(n):
            if matches[i] is None:
                for j in range(len(priors)):
                    value, dconf[i, j] = row(conf[i, j], 0)
                    conf_sum += value
    norm = max(1, {"VALID": count, "FULL": n * len(priors), "BATCH_SIZE": n, "NONE": 1}[o["norm"]])
    loss = (o["loc_weight"] * loc_sum + conf_sum) / norm
    return loss, dloc.reshape(n, -1) / norm, dconf.reshape(n, -1) / norm, matches


# -- helpers -----------------------------------------------------------------------------
def prior_blob(priors=PRIORS):
    var = np.tile(VARIANCE, (len(priors), 1))
    return torch.tensor(np.stack([priors.ravel(), var.ravel()])[None], dtype=torch.float32)


def label_blob(rows=ROWS):
    return torch.tensor(rows, dtype=torch.float32).reshape(1, 1, -1, 8)


def layer(params: str, loss_param: str = "", priors=len(PRIORS), n=2, loc_classes=1,
          rows=len(ROWS), extra: str = "", classes=C):
    if "use_difficult_gt" not in params:   # SSD's default is true; most cases drop them
        params += " use_difficult_gt: false"
    text = (f'name: "mbox_loss" type: "MultiBoxLoss" {extra} multibox_loss_param {{ '
            f'num_classes: {classes} {params} }} loss_param {{ {loss_param} }}')
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    shapes = [(n, priors * loc_classes * 4), (n, priors * classes), (1, 2, priors * 4),
              (1, 1, rows, 8)]
    return layer_class("MultiBoxLoss")(lp, shapes, 0)


def inputs(n=2, loc_classes=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, len(PRIORS) * loc_classes * 4, generator=g, dtype=torch.float64) * 2
    conf = torch.randn(n, len(PRIORS) * C, generator=g, dtype=torch.float64)
    return loc, conf


def run(lay, loc, conf, rows=ROWS, priors=PRIORS):
    loc, conf = loc.clone().requires_grad_(), conf.clone().requires_grad_()
    out = lay.double()(loc, conf, prior_blob(priors).double(), label_blob(rows).double())
    out.backward()
    grads = [np.zeros(t.shape) if t.grad is None else t.grad.numpy() for t in (loc, conf)]
    return out.item(), *grads


def ground_truth(use_difficult=False):
    return [(int(r[0]), r[3:7], int(r[1])) for r in ROWS
            if r[0] != -1 and (use_difficult or not r[7])]


def per_prior_losses(loc, conf):
    """Softmax loss against the matched label (background otherwise) plus smooth L1, and
    which priors are matched."""
    out, positive = np.zeros((2, len(PRIORS))), np.zeros((2, len(PRIORS)), dtype=bool)
    for i in range(2):
        boxes = [g for g in ground_truth() if g[0] == i]
        m, _ = match(PRIORS, [g[1] for g in boxes], True, 0.5)
        positive[i] = m > -1
        for j in range(len(PRIORS)):
            label = boxes[m[j]][2] if m[j] > -1 else 0
            out[i, j] = softmax_row(conf.reshape(2, -1, C)[i, j], label)[0]
            if m[j] > -1:
                d = loc.reshape(2, -1, 4)[i, j] - encode(np.array(boxes[m[j]][1]), PRIORS[j],
                                                         np.array(VARIANCE), "CENTER_SIZE")
                out[i, j] += np.where(abs(d) < 1, 0.5 * d * d, abs(d) - 0.5).sum()
    return out, positive


def greedy_nms(losses, threshold):
    """Priors by descending loss, each dropping the later ones it overlaps by more."""
    order, kept = list(np.argsort(-losses, kind="stable")), []
    while order:
        best = order.pop(0)
        kept.append(best)
        order = [j for j in order if iou(PRIORS[best], PRIORS[j]) <= threshold]
    return kept


# -- a tiny SSD ----------------------------------------------------------------------------
def _conv(name, bottom, out, stride=1, relu=True):
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {out} kernel_size: 3 pad: 1 stride: {stride} '
            'weight_filler { type: "xavier" } bias_filler { type: "constant" } } }\n')
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def _head(source, min_size, max_size, classes=2, priors=4):
    """SSD's per-source head: loc and conf convolutions, permuted to NHWC and flattened,
    and the source's priors."""
    text = ""
    for kind, out in (("loc", priors * 4), ("conf", priors * classes)):
        name = f"{source}_mbox_{kind}"
        text += _conv(name, source, out, relu=False)
        text += (f'layer {{ name: "{name}_perm" type: "Permute" bottom: "{name}" '
                 f'top: "{name}_perm" permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                 f'layer {{ name: "{name}_flat" type: "Flatten" bottom: "{name}_perm" '
                 f'top: "{name}_flat" flatten_param {{ axis: 1 }} }}\n')
    return text + (f'layer {{ name: "{source}_mbox_priorbox" type: "PriorBox" bottom: "{source}" '
                   f'bottom: "data" top: "{source}_mbox_priorbox" prior_box_param {{ '
                   f'min_size: {min_size} max_size: {max_size} aspect_ratio: 2 flip: true '
                   'variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }\n')


def _concat(top, kind, axis):
    bottoms = " ".join(f'bottom: "{s}_mbox_{kind}"' for s in ("conv2", "conv3"))
    return (f'layer {{ name: "{top}" type: "Concat" {bottoms} top: "{top}" '
            f'concat_param {{ axis: {axis} }} }}\n')


def tiny_ssd_nets() -> tuple[str, str]:
    """(train, deploy) prototxt of a two-source SSD on a 16x16 image, 2 classes."""
    body = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }\n'
            + _conv("conv1", "data", 8)
            + 'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
              'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            + _conv("conv2", "pool1", 8, stride=2) + _conv("conv3", "conv2", 8, stride=2)
            + _head("conv2", 6, 10) + _head("conv3", 10, 14)
            + _concat("mbox_loc", "loc_flat", 1) + _concat("mbox_conf", "conf_flat", 1)
            + _concat("mbox_priorbox", "priorbox", 2))
    train = body + (
        'layer { name: "label" type: "Input" top: "label" '
        'input_param { shape { dim: 1 dim: 1 dim: 1 dim: 8 } } }\n'
        'layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc" bottom: "mbox_conf" '
        'bottom: "mbox_priorbox" bottom: "label" top: "mbox_loss" propagate_down: true '
        'propagate_down: true propagate_down: false propagate_down: false '
        'loss_param { normalization: VALID } multibox_loss_param { loc_loss_type: SMOOTH_L1 '
        'conf_loss_type: SOFTMAX loc_weight: 1 num_classes: 2 share_location: true '
        'match_type: PER_PREDICTION overlap_threshold: 0.5 use_prior_for_matching: true '
        'background_label_id: 0 use_difficult_gt: true neg_pos_ratio: 3 neg_overlap: 0.5 '
        'code_type: CENTER_SIZE } }\n')
    deploy = body + (
        'layer { name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" '
        'top: "mbox_conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }\n'
        'layer { name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" '
        'top: "mbox_conf_softmax" softmax_param { axis: 2 } }\n'
        'layer { name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" '
        'top: "mbox_conf_flatten" flatten_param { axis: 1 } }\n'
        'layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" '
        'bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_out" '
        'detection_output_param { num_classes: 2 share_location: true background_label_id: 0 '
        'nms_param { nms_threshold: 0.45 top_k: 50 } code_type: CENTER_SIZE keep_top_k: 5 '
        'confidence_threshold: 0.1 } }\n')
    return train, deploy
