"""The float64 side of the conversion-tool tests: the parsing helpers converters share (V1
enum names, kaffe's get_kernel_value over the scalar and repeated conv/pool fields) and a numpy
forward that reads every hyper-parameter from the protobuf layer, as a converter does."""
from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from caffe.proto import caffe_pb2 as pb

V1_NAMES = {"CONVOLUTION": "Convolution", "RELU": "ReLU", "POOLING": "Pooling", "DROPOUT":
            "Dropout", "INNER_PRODUCT": "InnerProduct", "SOFTMAX": "Softmax"}


def layer_kind(layer):
    """MMdnn's map_raw_kind: V1 enum numbers by their enum name, new types as they are."""
    if isinstance(layer.type, int):
        return V1_NAMES[pb.V1LayerParameter.LayerType.Name(layer.type)]
    return layer.type


def kernel_value(scalar, repeated, idx, default=None):
    """kaffe/layers.py's get_kernel_value over the scalar and repeated conv/pool fields."""
    if scalar:
        return scalar
    if isinstance(repeated, int):
        return repeated or default
    if len(repeated) == 1:
        return int(repeated[0])
    return repeated[idx] if len(repeated) else default


def kernel_params(params):
    return (kernel_value(params.kernel_h, params.kernel_size, 0),
            kernel_value(params.kernel_w, params.kernel_size, 1),
            kernel_value(params.stride_h, params.stride, 0, 1),
            kernel_value(params.stride_w, params.stride, 1, 1),
            kernel_value(params.pad_h, params.pad, 0, 0),
            kernel_value(params.pad_w, params.pad, 1, 0))


def read_def(path, phase="test"):
    """GraphBuilder.load + filter_layers + make_input_nodes: layers kept for ``phase`` and
    the input shape from input_dim, input_shape or an Input layer."""
    net = pb.NetParameter()
    with open(path, "rb") as f:
        text_format.Merge(f.read(), net)
    layers = [lr for lr in (net.layers or net.layer)
              if not len(lr.include) or {0: "train", 1: "test"}[lr.include[0].phase] == phase]
    dims = list(map(int, net.input_dim)) or \
        (list(map(int, net.input_shape[0].dim)) if len(net.input_shape) else None)
    if dims is None:
        dims = list(map(int, next(lr for lr in layers if layer_kind(lr) == "Input")
                        .input_param.shape[0].dim))
    return net, layers, dims


def _conv(x, w, b, kh, kw, sh, sw, ph, pw):
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h, out_w = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    out = np.empty((x.shape[0], w.shape[0], out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return out + b[None, :, None, None]


def _pool(x, method, kh, kw, sh, sw):
    """Caffe's unpadded pooling: ceil output size, the last window clipped to the input."""
    height, width = x.shape[2:]
    out_h, out_w = -(-(height - kh) // sh) + 1, -(-(width - kw) // sw) + 1
    out = np.empty(x.shape[:2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            win = x[:, :, i * sh:min(i * sh + kh, height), j * sw:min(j * sw + kw, width)]
            out[:, :, i, j] = win.max(axis=(2, 3)) if method == pb.PoolingParameter.MAX \
                else win.mean(axis=(2, 3))
    return out


def forward(layers, weights, x):
    """A converter's float64 forward: every hyper-parameter read from the protobuf layer."""
    blobs = {"data": x.astype(np.float64)}
    for lr in layers:
        kind, w = layer_kind(lr), [np.asarray(a, np.float64) for a in weights.get(lr.name, [])]
        bottom = blobs[lr.bottom[0]] if len(lr.bottom) else None
        if kind == "Convolution":
            y = _conv(bottom, w[0], w[1], *kernel_params(lr.convolution_param))
        elif kind == "BatchNorm":       # pytorch-caffe: statistics over the scale factor
            s = 1.0 / w[2][0] if w[2][0] else 0.0
            eps = lr.batch_norm_param.eps
            y = (bottom - (w[0] * s)[:, None, None]) / np.sqrt(w[1] * s + eps)[:, None, None]
        elif kind == "Scale":
            y = bottom * w[0][:, None, None] + w[1][:, None, None]
        elif kind == "ReLU":
            y = np.maximum(bottom, 0) + lr.relu_param.negative_slope * np.minimum(bottom, 0)
        elif kind == "Pooling":
            kh, kw, sh, sw, _, _ = kernel_params(lr.pooling_param)
            y = _pool(bottom, lr.pooling_param.pool, kh, kw, sh, sw)
        elif kind == "InnerProduct":
            y = bottom.reshape(len(bottom), -1) @ w[0].reshape(w[0].shape[0], -1).T + w[1]
        elif kind == "Softmax":
            e = np.exp(bottom - bottom.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        else:
            continue                    # Input, Dropout at test time
        blobs[lr.top[0]] = y
    return blobs
