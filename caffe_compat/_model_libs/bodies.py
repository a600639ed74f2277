"""Base networks of SSD's ``model_libs``: VGG-16, ZF and ResNet-101/152 bodies.

Layer names are those of the released Caffe models (``conv4_3``, ``fc7``, ``res4b22``, ...)
so that pretrained caffemodels load by name into the nets these build.
"""
from __future__ import annotations

from caffe_compat.net_spec import layers as L, params as P

from caffe_compat._model_libs.blocks import (ConvBNLayer, ResBody, freeze, learned_conv_kwargs,
                                             require_top, same_pad)

# VGG-16 stages 1-4: (channels, convolutions); stage 5 follows with its own dilation.
_VGG_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3))


def _conv_relu(net, bottom: str, name: str, relu: str, kwargs: dict, **conv) -> str:
    net[name] = L.Convolution(net[bottom], **conv, **kwargs)
    net[relu] = L.ReLU(net[name], in_place=True)
    return relu


def _vgg_downsample(net, bottom: str, stage: int, depth: int, width: int, nopool: bool,
                    kwargs: dict) -> str:
    """Halve the resolution after a stage: ``pool<stage>`` (2x2 max) or, with ``nopool``,
    a stride-2 3x3 convolution ``conv<stage>_<depth+1>``."""
    if nopool:
        name = f"conv{stage}_{depth + 1}"
        net[name] = L.Convolution(net[bottom], num_output=width, pad=1, kernel_size=3,
                                  stride=2, **kwargs)
    else:
        name = f"pool{stage}"
        net[name] = L.Pooling(net[bottom], pool=P.Pooling.MAX, kernel_size=2, stride=2)
    return name


def _fc_head(net, bottom: str, fully_conv: bool, dropout: bool, kwargs: dict,
             fc6: dict, fc7_outputs: int) -> None:
    """fc6/relu6[/drop6] and fc7/relu7[/drop7]: convolutions (``fc6`` holds fc6's geometry)
    when ``fully_conv``, else 4096-wide InnerProduct layers with Caffe's default fillers."""
    if fully_conv:
        net.fc6 = L.Convolution(net[bottom], **fc6, **kwargs)
    else:
        net.fc6 = L.InnerProduct(net[bottom], num_output=4096)
    net.relu6 = L.ReLU(net.fc6, in_place=True)
    if dropout:
        net.drop6 = L.Dropout(net.relu6, dropout_ratio=0.5, in_place=True)
    if fully_conv:
        net.fc7 = L.Convolution(net.relu6, num_output=fc7_outputs, kernel_size=1, **kwargs)
    else:
        net.fc7 = L.InnerProduct(net.relu6, num_output=4096)
    net.relu7 = L.ReLU(net.fc7, in_place=True)
    if dropout:
        net.drop7 = L.Dropout(net.relu7, dropout_ratio=0.5, in_place=True)


def VGGNetBody(net, from_layer, need_fc=True, fully_conv=False, reduced=False,
               dilated=False, nopool=False, dropout=True, freeze_layers=None,
               dilate_pool4=False):
    """VGG-16 on top ``from_layer``: conv1_1 ... conv5_3 with relu/pool layers, then
    (``need_fc``) pool5, fc6, fc7.

    ``fully_conv`` makes fc6/fc7 convolutions; ``reduced`` gives them 1024 channels and a
    3x3 fc6 (else 4096 and 7x7); ``dilated`` keeps pool5 at stride 1 (3x3, pad 1) and
    dilates fc6 (6 when reduced, 2 otherwise; 3 for reduced without ``dilated``) -- SSD's
    "atrous" VGG is ``fully_conv=True, reduced=True, dilated=True``. ``dilate_pool4`` makes
    pool4 stride 1 and dilates conv5_x by 2 (fc6's dilation doubles too). ``nopool``
    replaces each pooling by a stride-2 convolution ``conv<i>_<last+1>``. ``freeze_layers``
    get learning rate 0. Returns ``net``.
    """
    require_top(net, from_layer, "VGGNetBody")
    kwargs = learned_conv_kwargs()
    bottom = from_layer
    for stage, (width, depth) in enumerate(_VGG_STAGES, start=1):
        for i in range(1, depth + 1):
            bottom = _conv_relu(net, bottom, f"conv{stage}_{i}", f"relu{stage}_{i}", kwargs,
                                num_output=width, pad=1, kernel_size=3)
        if stage < 4 or nopool:
            bottom = _vgg_downsample(net, bottom, stage, depth, width, nopool, kwargs)
    dilation = 1
    if not nopool:
        if dilate_pool4:
            net.pool4 = L.Pooling(net[bottom], pool=P.Pooling.MAX, kernel_size=3, stride=1,
                                  pad=1)
            dilation = 2
        else:
            net.pool4 = L.Pooling(net[bottom], pool=P.Pooling.MAX, kernel_size=2, stride=2)
        bottom = "pool4"
    for i in (1, 2, 3):
        bottom = _conv_relu(net, bottom, f"conv5_{i}", f"relu5_{i}", kwargs, num_output=512,
                            pad=same_pad(3, dilation), kernel_size=3, dilation=dilation)
    if need_fc:
        stride = 1 if dilated else 2
        if nopool:
            net.conv5_4 = L.Convolution(net[bottom], num_output=512, pad=1, kernel_size=3,
                                        stride=stride, **kwargs)
            bottom = "conv5_4"
        else:
            window = dict(pad=1, kernel_size=3) if dilated else dict(kernel_size=2)
            net.pool5 = L.Pooling(net[bottom], pool=P.Pooling.MAX, stride=stride, **window)
            bottom = "pool5"
        # (extra dilation, kernel, channels) of fc6 seen as a convolution
        factor, kernel, width = {(True, True): (6, 3, 1024), (True, False): (2, 7, 4096),
                                 (False, True): (3, 3, 1024), (False, False): (1, 7, 4096)
                                 }[(bool(dilated), bool(reduced))]
        dilation *= factor
        fc6 = dict(num_output=width, pad=same_pad(kernel, dilation), kernel_size=kernel,
                   dilation=dilation)
        _fc_head(net, bottom, fully_conv, dropout, kwargs, fc6, 1024 if reduced else 4096)
    freeze(net, freeze_layers)
    return net


def _zf_conv_relu_norm_pool(net, bottom: str, stage: int, kwargs: dict, **conv) -> str:
    relu = _conv_relu(net, bottom, f"conv{stage}", f"relu{stage}", kwargs, **conv)
    net[f"norm{stage}"] = L.LRN(net[relu], local_size=3, alpha=0.00005, beta=0.75,
                                norm_region=P.LRN.WITHIN_CHANNEL, engine=P.LRN.CAFFE)
    net[f"pool{stage}"] = L.Pooling(net[f"norm{stage}"], pool=P.Pooling.MAX, pad=1,
                                    kernel_size=3, stride=2)
    return f"pool{stage}"


def ZFNetBody(net, from_layer, need_fc=True, fully_conv=False, reduced=False,
              dilated=False, dropout=True, need_fc8=False, freeze_layers=None):
    """Zeiler-Fergus net on top ``from_layer``: conv1-conv5 (LRN ``norm1``/``norm2``, 3x3
    pools), then (``need_fc``) pool5, fc6, fc7 -- the options as in :func:`VGGNetBody`
    (fully-conv fc6: reduced 1024 x 3x3, else 4096 x 6x6; ``dilated`` keeps pool5 at stride
    1). ``need_fc8`` adds a 1000-way ``fc8`` and ``prob`` (Softmax) after the last top.
    Returns ``net``.
    """
    require_top(net, from_layer, "ZFNetBody")
    kwargs = learned_conv_kwargs()
    bottom = _zf_conv_relu_norm_pool(net, from_layer, 1, kwargs, num_output=96, pad=3,
                                     kernel_size=7, stride=2)
    bottom = _zf_conv_relu_norm_pool(net, bottom, 2, kwargs, num_output=256, pad=2,
                                     kernel_size=5, stride=2)
    for stage, width in ((3, 384), (4, 384), (5, 256)):
        bottom = _conv_relu(net, bottom, f"conv{stage}", f"relu{stage}", kwargs,
                            num_output=width, pad=1, kernel_size=3)
    if need_fc:
        net.pool5 = L.Pooling(net[bottom], pool=P.Pooling.MAX, pad=1, kernel_size=3,
                              stride=1 if dilated else 2)
        fc6 = {(True, True): dict(num_output=1024, pad=5, kernel_size=3, dilation=5),
               (True, False): dict(num_output=4096, pad=5, kernel_size=6, dilation=2),
               (False, True): dict(num_output=1024, pad=2, kernel_size=3, dilation=2),
               (False, False): dict(num_output=4096, pad=2, kernel_size=6),
               }[(bool(dilated), bool(reduced))]
        _fc_head(net, "pool5", fully_conv, dropout, kwargs, fc6, 1024 if reduced else 4096)
    if need_fc8:
        last = net[net.keys()[-1]]
        if fully_conv:
            net.fc8 = L.Convolution(last, num_output=1000, kernel_size=1, **kwargs)
        else:
            net.fc8 = L.InnerProduct(last, num_output=1000)
        net.prob = L.Softmax(net.fc8)
    freeze(net, freeze_layers)
    return net


def _resnet_blocks(stage3_extra: int, stage4_extra: int):
    """(block name, bottleneck width, stride, has projection) of ResNet stages 2-4."""
    yield from (("2a", 64, 1, True), ("2b", 64, 1, False), ("2c", 64, 1, False))
    for stage, width, extra in ((3, 128, stage3_extra), (4, 256, stage4_extra)):
        yield f"{stage}a", width, 2, True
        for i in range(1, extra + 1):
            yield f"{stage}b{i}", width, 1, False


def _resnet_body(net, from_layer, stage3_extra: int, stage4_extra: int, use_pool5: bool,
                 use_dilation_conv5: bool, bn_param: dict):
    require_top(net, from_layer, "ResNet body")
    ConvBNLayer(net, from_layer, "conv1", use_bn=True, use_relu=True, num_output=64,
                kernel_size=7, pad=3, stride=2, conv_prefix="", conv_postfix="",
                bn_prefix="bn_", bn_postfix="", scale_prefix="scale_", scale_postfix="",
                **bn_param)
    net.pool1 = L.Pooling(net.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    bottom = "pool1"
    for block, width, stride, projection in _resnet_blocks(stage3_extra, stage4_extra):
        ResBody(net, bottom, block, out2a=width, out2b=width, out2c=4 * width, stride=stride,
                use_branch1=projection, **bn_param)
        bottom = f"res{block}"
    # conv5 at stride 1 with dilation 2 keeps the stride-16 resolution (as DeepLab does)
    stride, dilation = (1, 2) if use_dilation_conv5 else (2, 1)
    for block, first in (("5a", True), ("5b", False), ("5c", False)):
        ResBody(net, bottom, block, out2a=512, out2b=512, out2c=2048,
                stride=stride if first else 1, use_branch1=first, dilation=dilation,
                **bn_param)
        bottom = f"res{block}"
    if use_pool5:
        net.pool5 = L.Pooling(net.res5c, pool=P.Pooling.AVE, global_pooling=True)
    return net


def ResNet101Body(net, from_layer, use_pool5=True, use_dilation_conv5=False, **bn_param):
    """ResNet-101 (conv1, res2a ... res5c; blocks 3b1-3b3 and 4b1-4b22) on top
    ``from_layer``; ``pool5`` global average pooling when ``use_pool5``;
    ``use_dilation_conv5`` runs stage 5 at stride 1, dilation 2. ``bn_param`` goes to every
    :func:`ConvBNLayer`. Returns ``net``."""
    return _resnet_body(net, from_layer, 3, 22, use_pool5, use_dilation_conv5, bn_param)


def ResNet152Body(net, from_layer, use_pool5=True, use_dilation_conv5=False, **bn_param):
    """ResNet-152 (blocks 3b1-3b7 and 4b1-4b35); otherwise as :func:`ResNet101Body`."""
    return _resnet_body(net, from_layer, 7, 35, use_pool5, use_dilation_conv5, bn_param)
