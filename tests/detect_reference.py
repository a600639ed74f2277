"""Float64 references of the layers the detection/segmentation script tests run (written
from Caffe's and Fast R-CNN's sources), small prototxt builders, and the tiny nets: MTCNN's
P-Net and R-Net, a HED deploy net, Fast/Faster R-CNN test nets."""
from __future__ import annotations

import math

import numpy as np

FLT_MIN = np.finfo(np.float32).tiny


def conv(x, w, b=None, stride=1, pad=0):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    y = np.einsum("nchwij,ocij->nohw", win[:, :, ::stride, ::stride], w)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def max_pool(x, k, s):
    """MAX pooling without pad: ceil output size, windows clipped to the map."""
    h, w = x.shape[2:]
    oh, ow = math.ceil((h - k) / s) + 1, math.ceil((w - k) / s) + 1
    x = np.pad(x, ((0, 0), (0, 0), (0, (oh - 1) * s + k - h), (0, (ow - 1) * s + k - w)),
               constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[
        :, :, ::s, ::s].max(axis=(4, 5))


def deconv(x, w, stride):
    """Deconvolution without pad, one group: weights (C_in, C_out, k, k)."""
    n, _, h, wd = x.shape
    k = w.shape[2]
    y = np.zeros((n, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            y[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
                "nc,cokl->nokl", x[:, :, i, j], w)
    return y


def roi_pool(x, rois, ph, pw, scale):
    """Fast R-CNN's ROIPooling: C round() corners, float bin sizes, floor/ceil bins."""
    out = np.zeros((len(rois), x.shape[1], ph, pw))
    H, W = x.shape[2:]
    for r, (b, *box) in enumerate(rois):
        x1, y1, x2, y2 = (np.floor(np.float64(v) * scale + 0.5) for v in box)
        bh, bw = max(y2 - y1 + 1, 1) / ph, max(x2 - x1 + 1, 1) / pw
        for i in range(ph):
            hs, he = (int(np.clip(v, 0, H)) for v in (np.floor(i * bh) + y1, np.ceil((i + 1) * bh) + y1))
            for j in range(pw):
                ws, we = (int(np.clip(v, 0, W)) for v in (np.floor(j * bw) + x1, np.ceil((j + 1) * bw) + x1))
                if he > hs and we > ws:
                    out[r, :, i, j] = x[int(b), :, hs:he, ws:we].max(axis=(1, 2))
    return out


def prelu(x, slope):
    return np.where(x > 0, x, x * slope.reshape((1, -1) + (1,) * (x.ndim - 2)))


def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def params64(net):
    """Float64 copies of every parameter, read once (a numpy view handed out between
    forwards counts as an edit: an engine re-exports, after two of them torch runs)."""
    copies = {(n, i): b.data.astype(np.float64) for n, v in net.params.items()
              for i, b in enumerate(v)}
    return lambda name, i=0: copies[name, i]


def write(tmp_path, name, text):
    (tmp_path / name).write_text(str(text))
    return str(tmp_path / name)


def layer(name, kind, bottoms, tops, body=""):
    wires = "".join(f' bottom: "{b}"' for b in bottoms.split()) + \
        "".join(f' top: "{t}"' for t in tops.split())
    return f'layer {{ name: "{name}" type: "{kind}"{wires} {body} }}\n'


def cv(n, k, extra=""):
    return (f"convolution_param {{ num_output: {n} kernel_size: {k} {extra} weight_filler "
            '{ type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } }')


def ip(n):
    return (f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" '
            'std: 0.2 } bias_filler { type: "gaussian" std: 0.1 } }')


def pool(k):
    return f"pooling_param {{ pool: MAX kernel_size: {k} stride: 2 }}"


def legacy_input(*dims):
    return 'input: "data"\n' + "".join(f"input_dim: {d}\n" for d in dims)


# -- the tiny nets and their float64 forwards -----------------------------------------
PNET = (legacy_input(1, 3, 12, 12) + layer("conv1", "Convolution", "data", "conv1", cv(4, 3))
        + layer("PReLU1", "PReLU", "conv1", "conv1") + layer("pool1", "Pooling", "conv1", "pool1", pool(2))
        + layer("conv2", "Convolution", "pool1", "conv2", cv(6, 3)) + layer("PReLU2", "PReLU", "conv2", "conv2")
        + layer("conv4-1", "Convolution", "conv2", "conv4-1", cv(2, 1))
        + layer("conv4-2", "Convolution", "conv2", "conv4-2", cv(4, 1))
        + layer("prob1", "Softmax", "conv4-1", "prob1"))
RNET = (legacy_input(1, 3, 24, 24) + layer("conv1", "Convolution", "data", "conv1", cv(4, 3))
        + layer("prelu1", "PReLU", "conv1", "conv1") + layer("pool1", "Pooling", "conv1", "pool1", pool(3))
        + layer("conv2", "Convolution", "pool1", "conv2", cv(6, 3)) + layer("prelu2", "PReLU", "conv2", "conv2")
        + layer("conv4", "InnerProduct", "conv2", "conv4", ip(16)) + layer("prelu4", "PReLU", "conv4", "conv4")
        + layer("conv5-1", "InnerProduct", "conv4", "conv5-1", ip(2))
        + layer("conv5-2", "InnerProduct", "conv4", "conv5-2", ip(4))
        + layer("prob1", "Softmax", "conv5-1", "prob1"))


def pnet_reference(p, x):
    h = max_pool(prelu(conv(x, p("conv1"), p("conv1", 1)), p("PReLU1")), 2, 2)
    h = prelu(conv(h, p("conv2"), p("conv2", 1)), p("PReLU2"))
    return softmax(conv(h, p("conv4-1"), p("conv4-1", 1))), conv(h, p("conv4-2"), p("conv4-2", 1))


def rnet_reference(p, x):
    h = max_pool(prelu(conv(x, p("conv1"), p("conv1", 1)), p("prelu1")), 3, 2)
    h = prelu(conv(h, p("conv2"), p("conv2", 1)), p("prelu2")).reshape(len(x), -1)
    h = prelu(h @ p("conv4").T + p("conv4", 1), p("prelu4"))
    return softmax(h @ p("conv5-1").T + p("conv5-1", 1)), h @ p("conv5-2").T + p("conv5-2", 1)


HED = (legacy_input(1, 3, 16, 16)
       + layer("conv1_1", "Convolution", "data", "conv1_1", cv(4, 3, "pad: 1 engine: CAFFE"))
       + layer("relu1_1", "ReLU", "conv1_1", "conv1_1") + layer("pool1", "Pooling", "conv1_1", "pool1", pool(2))
       + layer("conv2_1", "Convolution", "pool1", "conv2_1", cv(4, 3, "pad: 1"))
       + layer("score-dsn1", "Convolution", "conv1_1", "upscore-dsn1", cv(1, 1))
       + layer("sigmoid-dsn1", "Sigmoid", "upscore-dsn1", "sigmoid-dsn1")
       + layer("score-dsn2", "Convolution", "conv2_1", "score-dsn2", cv(1, 1))
       + layer("upsample_2", "Deconvolution", "score-dsn2", "score-dsn2-up",
               "convolution_param { kernel_size: 4 stride: 2 num_output: 1 }")
       + layer("crop", "Crop", "score-dsn2-up data", "upscore-dsn2", "crop_param { offset: 1 }")
       + layer("sigmoid-dsn2", "Sigmoid", "upscore-dsn2", "sigmoid-dsn2")
       + layer("concat", "Concat", "upscore-dsn1 upscore-dsn2", "concat-upscore", "concat_param { concat_dim: 1 }")
       + layer("new-score-weighting", "Convolution", "concat-upscore", "upscore-fuse",
               'convolution_param { num_output: 1 kernel_size: 1 weight_filler { type: "constant" value: 0.2 } }')
       + layer("sigmoid-fuse", "Sigmoid", "upscore-fuse", "sigmoid-fuse"))


def frcnn_net(has_rpn):
    rpn = ('input: "im_info" input_shape { dim: 1 dim: 3 }\n'
           + layer("rpn_cls_score", "Convolution", "data", "rpn_cls_score", cv(2, 2, "stride: 2"))
           + layer("rpn_cls_score_reshape", "Reshape", "rpn_cls_score", "rpn_cls_score_reshape", RESHAPE)
           + layer("rpn_cls_prob", "Softmax", "rpn_cls_score_reshape", "rpn_cls_prob")
           + layer("rpn_cls_prob_reshape", "Reshape", "rpn_cls_prob", "rpn_cls_prob_reshape", RESHAPE)
           + layer("proposal", "Python", "rpn_cls_prob_reshape im_info", "rois",
                   "python_param { module: 'rpn_layers' layer: 'ProposalLayer' "
                   "param_str: \"{'feat_stride': 2}\" }"))
    return ('input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }\n'
            + (rpn if has_rpn else 'input: "rois" input_shape { dim: 1 dim: 5 }\n') + frcnn_head()
            + layer("cls_prob", "Softmax", "cls_score", "cls_prob"))


RESHAPE = "reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } }"


def frcnn_head():
    return (layer("conv1", "Convolution", "data", "conv1", cv(4, 3, "pad: 1"))
            + layer("relu1", "ReLU", "conv1", "conv1")
            + layer("roi_pool5", "ROIPooling", "conv1 rois", "pool5",
                    "roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.5 }")
            + layer("cls_score", "InnerProduct", "pool5", "cls_score", ip(3))
            + layer("bbox_pred", "InnerProduct", "pool5", "bbox_pred", ip(12)))


def frcnn_reference(p, data, rois):
    feat = np.maximum(conv(data.astype(np.float64), p("conv1"), p("conv1", 1), pad=1), 0)
    pooled = roi_pool(feat, rois, 2, 2, 0.5).reshape(len(rois), -1)
    return (pooled @ p("cls_score").T + p("cls_score", 1), pooled @ p("bbox_pred").T + p("bbox_pred", 1))


def random_rois(rng, h, w, r):
    x1, y1 = rng.uniform(0, w / 2, r), rng.uniform(0, h / 2, r)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, w / 2, r), y1 + rng.uniform(2, h / 2, r)], 1)
    return np.hstack((np.zeros((r, 1)), boxes)).astype(np.float32, copy=False)
