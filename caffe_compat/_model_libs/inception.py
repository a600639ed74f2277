"""Inception-v3 body of SSD's ``model_libs``, with the layer names of the TensorFlow-converted
Caffe model SSD used (``mixed_4/tower_1/conv_3``, ``mixed_9/tower/mixed/conv_1``, ...).

Every convolution is a :func:`ConvBNLayer` with BatchNorm and a Bias (no Scale: the
converted model's scale is fixed to 1) and ReLU.
"""
from __future__ import annotations

from caffe_compat.net_spec import layers as L, params as P

from caffe_compat._model_libs.blocks import ConvBNLayer, InceptionTower, require_top


def _conv(name: str, num_output: int, kernel=1, pad=0, stride=1) -> dict:
    """One convolution of a tower; ``kernel``/``pad`` may be ``[h, w]`` (then stride 1x1)."""
    if isinstance(kernel, list):
        stride = [stride, stride]
    return dict(name=name, num_output=num_output, kernel_size=kernel, pad=pad, stride=stride)


def _pool(method, pad: int, stride: int) -> dict:
    return dict(name="pool", pool=method, kernel_size=3, pad=pad, stride=stride)


def _mixed(net, bottom: str, block: str, towers, bn_param: dict) -> str:
    """Towers side by side from ``bottom``, joined by ``<block>/join`` (channel Concat).
    ``towers``: (suffix, layer list) pairs; the suffix is appended to ``block``."""
    tops = [InceptionTower(net, bottom, f"{block}{suffix}", layers, **bn_param)
            for suffix, layers in towers]
    net[f"{block}/join"] = L.Concat(*tops, axis=1)
    return f"{block}/join"


def _split_3x3(net, bottom: str, prefix: str, width: int, bn_param: dict):
    """``<prefix>/mixed``: a 1x3 and a 3x1 convolution of ``bottom``, concatenated."""
    name = f"{prefix}/mixed"
    halves = [InceptionTower(net, bottom, name, [_conv(conv, width, kernel, pad)], **bn_param)
              for conv, kernel, pad in (("conv", [1, 3], [0, 1]), ("conv_1", [3, 1], [1, 0]))]
    net[name] = L.Concat(*halves, axis=1)
    return net[name]


def _stem(net, bottom: str, bn_param: dict) -> str:
    """conv, conv_1, conv_2, pool, conv_3, conv_4, pool_1 (299x299 -> 35x35)."""
    stem = (("conv", 32, 3, 0, 2), ("conv_1", 32, 3, 0, 1), ("conv_2", 64, 3, 1, 1), "pool",
            ("conv_3", 80, 1, 0, 1), ("conv_4", 192, 3, 0, 1), "pool_1")
    for step in stem:
        if isinstance(step, str):
            net[step] = L.Pooling(net[bottom], pool=P.Pooling.MAX, kernel_size=3, stride=2,
                                  pad=0)
            bottom = step
            continue
        name, width, kernel, pad, stride = step
        ConvBNLayer(net, bottom, name, use_bn=True, use_relu=True, num_output=width,
                    kernel_size=kernel, pad=pad, stride=stride, use_scale=False, **bn_param)
        bottom = name
    return bottom


def _factorized_7x7(width: int, out: int, order) -> list:
    """1x1 to ``width``, then 1x7 / 7x1 convolutions in ``order`` (the last to ``out``)."""
    shapes = {"1x7": ([1, 7], [0, 3]), "7x1": ([7, 1], [3, 0])}
    layers = [_conv("conv", width)]
    for i, shape in enumerate(order, start=1):
        kernel, pad = shapes[shape]
        layers.append(_conv(f"conv_{i}", out if i == len(order) else width, kernel, pad))
    return layers


def InceptionV3Body(net, from_layer, output_pred=False, **bn_param):
    """Inception-v3 on top ``from_layer``: the stem, ``mixed`` ... ``mixed_10`` (each ending
    in ``<block>/join``), and with ``output_pred`` the classifier ``pool_3``, ``softmax``
    (1008-way InnerProduct) and ``softmax_prob``. ``bn_param`` goes to every
    :func:`ConvBNLayer`. Returns ``net``."""
    require_top(net, from_layer, "InceptionV3Body")
    bottom = _stem(net, from_layer, bn_param)
    for block, pool_width in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):   # 35x35
        bottom = _mixed(net, bottom, block, [
            ("", [_conv("conv", 64)]),
            ("/tower", [_conv("conv", 48), _conv("conv_1", 64, 5, 2)]),
            ("/tower_1", [_conv("conv", 64), _conv("conv_1", 96, 3, 1),
                          _conv("conv_2", 96, 3, 1)]),
            ("/tower_2", [_pool(P.Pooling.AVE, 1, 1), _conv("conv", pool_width)]),
        ], bn_param)
    bottom = _mixed(net, bottom, "mixed_3", [                                     # -> 17x17
        ("", [_conv("conv", 384, 3, 0, 2)]),
        ("/tower", [_conv("conv", 64), _conv("conv_1", 96, 3, 1), _conv("conv_2", 96, 3, 0, 2)]),
        ("", [_pool(P.Pooling.MAX, 0, 2)]),
    ], bn_param)
    for block, width in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160),
                         ("mixed_7", 192)):
        bottom = _mixed(net, bottom, block, [
            ("", [_conv("conv", 192)]),
            ("/tower", _factorized_7x7(width, 192, ("1x7", "7x1"))),
            ("/tower_1", _factorized_7x7(width, 192, ("7x1", "1x7", "7x1", "1x7"))),
            ("/tower_2", [_pool(P.Pooling.AVE, 1, 1), _conv("conv", 192)]),
        ], bn_param)
    bottom = _mixed(net, bottom, "mixed_8", [                                     # -> 8x8
        ("/tower", [_conv("conv", 192), _conv("conv_1", 320, 3, 0, 2)]),
        ("/tower_1", _factorized_7x7(192, 192, ("1x7", "7x1"))
         + [_conv("conv_3", 192, 3, 0, 2)]),
        ("", [_pool(P.Pooling.MAX, 0, 2)]),
    ], bn_param)
    for block, pool in (("mixed_9", P.Pooling.AVE), ("mixed_10", P.Pooling.MAX)):
        towers = [InceptionTower(net, bottom, block, [_conv("conv", 320)], **bn_param)]
        InceptionTower(net, bottom, f"{block}/tower", [_conv("conv", 384)], **bn_param)
        towers.append(_split_3x3(net, f"{block}/tower/conv", f"{block}/tower", 384, bn_param))
        InceptionTower(net, bottom, f"{block}/tower_1",
                       [_conv("conv", 448), _conv("conv_1", 384, 3, 1)], **bn_param)
        towers.append(_split_3x3(net, f"{block}/tower_1/conv_1", f"{block}/tower_1", 384,
                                 bn_param))
        towers.append(InceptionTower(net, bottom, f"{block}/tower_2",
                                     [_pool(pool, 1, 1), _conv("conv", 192)], **bn_param))
        net[f"{block}/join"] = L.Concat(*towers, axis=1)
        bottom = f"{block}/join"
    if output_pred:
        net.pool_3 = L.Pooling(net[bottom], pool=P.Pooling.AVE, kernel_size=8, pad=0, stride=1)
        net.softmax = L.InnerProduct(net.pool_3, num_output=1008)
        net.softmax_prob = L.Softmax(net.softmax)
    return net
