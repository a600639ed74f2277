"""Building blocks of SSD's ``model_libs``: a convolution with optional BatchNorm/Scale/ReLU,
a ResNet bottleneck, an Inception tower, and the AnnotatedData layer.

Every helper writes into a ``NetSpec`` under fixed names, because SSD's scripts refer to
blobs by name afterwards (``net.keys()[-1]``, ``from_layers=['conv4_3', 'fc7', ...]``).
"""
from __future__ import annotations

from collections.abc import Sequence

from caffe_compat.net_spec import layers as L, params as P
from caffe_compat.proto import caffe_pb2

_BN_KEYS = ("eps", "moving_average_fraction", "use_global_stats")


def require_top(net, name: str, caller: str) -> None:
    """Fail early, naming the missing blob and the ones there are."""
    if name not in net.keys():
        raise KeyError(f"{caller}: the NetSpec has no top '{name}' (tops: "
                       f"{', '.join(net.keys()) or 'none'})")


def same_pad(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps a stride-1 (dilated) convolution's output the input's size."""
    extent = kernel_size + (dilation - 1) * (kernel_size - 1)
    return (extent - 1) // 2


def learned_conv_kwargs(lr_mult: float = 1) -> dict:
    """Weights and bias learned (bias at twice the rate, no decay), Xavier / zero init."""
    return {"param": [dict(lr_mult=lr_mult, decay_mult=1), dict(lr_mult=2 * lr_mult, decay_mult=0)],
            "weight_filler": dict(type="xavier"),
            "bias_filler": dict(type="constant", value=0)}


def freeze(net, layer_names) -> None:
    """Give the named layers lr_mult 0 for weights and bias (names absent from ``net`` are
    skipped, as SSD's helpers skip them, so one list can serve several body variants)."""
    frozen = learned_conv_kwargs()
    frozen["param"] = [dict(lr_mult=0, decay_mult=0), dict(lr_mult=0, decay_mult=0)]
    present = net.keys()
    for name in layer_names or ():
        if name in present:
            net.update(name, dict(frozen))


def UnpackVariable(var, num: int) -> list:
    """``var`` as a list of ``num`` values: a list of that length as is, one value repeated.

    ``UnpackVariable(3, 2) == [3, 3]``, ``UnpackVariable([1, 7], 2) == [1, 7]``.
    """
    if isinstance(var, Sequence) and not isinstance(var, str):
        values = list(var)
        if len(values) == num:
            return values
        if len(values) != 1:
            raise ValueError(f"UnpackVariable: expected one value or {num}, got {values!r}")
        var = values[0]
    return [var] * num


def _conv_geometry(kernel_size, pad, stride) -> dict:
    """Square form (``kernel_size``/``pad``/``stride``) when height and width agree, else the
    ``_h``/``_w`` fields for all three."""
    kernel_h, kernel_w = UnpackVariable(kernel_size, 2)
    pad_h, pad_w = UnpackVariable(pad, 2)
    stride_h, stride_w = UnpackVariable(stride, 2)
    if kernel_h == kernel_w and pad_h == pad_w and stride_h == stride_w:
        return dict(kernel_size=kernel_h, pad=pad_h, stride=stride_h)
    return dict(kernel_h=kernel_h, kernel_w=kernel_w, pad_h=pad_h, pad_w=pad_w,
                stride_h=stride_h, stride_w=stride_w)


def _batch_norm_kwargs(bn_params: dict) -> tuple[dict, bool]:
    """(BatchNorm keyword parameters, whether its statistics are fixed)."""
    unknown = sorted(set(bn_params) - set(_BN_KEYS))
    if unknown:
        raise TypeError(f"ConvBNLayer: unknown batch-norm parameter(s) {unknown}; accepted: "
                        f"{', '.join(_BN_KEYS)}")
    frozen_stats = [dict(lr_mult=0, decay_mult=0)] * 3    # mean, variance, scale factor
    kwargs = {"param": frozen_stats, "eps": bn_params.get("eps", 0.001)}
    if bn_params.get("use_global_stats", False):
        # Only written when asked for: left unset, Caffe picks global stats in TEST only.
        kwargs["use_global_stats"] = True
        return kwargs, True
    kwargs["moving_average_fraction"] = bn_params.get("moving_average_fraction", 0.999)
    return kwargs, False


def ConvBNLayer(net, from_layer, out_layer, use_bn, use_relu, num_output,
                kernel_size, pad, stride, dilation=1, use_scale=True, lr_mult=1,
                conv_prefix='', conv_postfix='', bn_prefix='', bn_postfix='_bn',
                scale_prefix='', scale_postfix='_scale', bias_prefix='', bias_postfix='_bias',
                **bn_params):
    """Add a Convolution on top ``from_layer``, optionally followed (in place) by BatchNorm
    and Scale (or Bias when ``use_scale`` is False) and ReLU.

    Names: convolution ``<conv_prefix><out_layer><conv_postfix>``, BatchNorm
    ``<bn_prefix><out_layer><bn_postfix>``, Scale/Bias likewise, ReLU ``<conv name>_relu``.
    ``kernel_size``, ``pad``, ``stride`` are a number or ``[h, w]``; ``dilation`` is written
    only when above 1. Without BatchNorm the convolution learns a bias (Xavier weights);
    with it there is no bias (Gaussian std 0.01 weights) and ``bn_params`` may set ``eps``
    (0.001), ``moving_average_fraction`` (0.999) or ``use_global_stats`` (fixed statistics,
    and then the Scale/Bias is not learned either).
    """
    require_top(net, from_layer, "ConvBNLayer")
    conv_name = f"{conv_prefix}{out_layer}{conv_postfix}"
    conv_kwargs = _conv_geometry(kernel_size, pad, stride)
    if dilation > 1:
        conv_kwargs["dilation"] = dilation
    bn_kwargs, stats_fixed = _batch_norm_kwargs(bn_params)
    if use_bn:
        conv_kwargs.update(param=[dict(lr_mult=lr_mult, decay_mult=1)],
                           weight_filler=dict(type="gaussian", std=0.01), bias_term=False)
    else:
        conv_kwargs.update(learned_conv_kwargs(lr_mult))
    net[conv_name] = last = L.Convolution(net[from_layer], num_output=num_output,
                                          **conv_kwargs)
    if use_bn:
        affine_lr = 0 if stats_fixed else lr_mult
        net[f"{bn_prefix}{out_layer}{bn_postfix}"] = last = L.BatchNorm(
            last, in_place=True, **bn_kwargs)
        if use_scale:
            net[f"{scale_prefix}{out_layer}{scale_postfix}"] = last = L.Scale(
                last, in_place=True, bias_term=True,
                param=[dict(lr_mult=affine_lr, decay_mult=0)] * 2,
                filler=dict(type="constant", value=1.0),
                bias_filler=dict(type="constant", value=0.0))
        else:
            net[f"{bias_prefix}{out_layer}{bias_postfix}"] = last = L.Bias(
                last, in_place=True, param=[dict(lr_mult=affine_lr, decay_mult=0)],
                filler=dict(type="constant", value=0.0))
    if use_relu:
        net[f"{conv_name}_relu"] = L.ReLU(last, in_place=True)


def ResBody(net, from_layer, block_name, out2a, out2b, out2c, stride, use_branch1,
            dilation=1, **bn_param):
    """A ResNet bottleneck ``res<block_name>``: 1x1 (stride) -> 3x3 (dilation) -> 1x1,
    added to a 1x1 projection ``res<block>_branch1`` when ``use_branch1`` (else to the
    input), then ReLU. Layers are named as in the released ResNet models:
    ``res2a_branch2a``, ``bn2a_branch2a``, ``scale2a_branch2a``, ``res2a``, ``res2a_relu``.
    """
    names = dict(conv_prefix=f"res{block_name}_", conv_postfix="",
                 bn_prefix=f"bn{block_name}_", bn_postfix="",
                 scale_prefix=f"scale{block_name}_", scale_postfix="", use_scale=True)
    names.update(bn_param)
    shortcut = from_layer
    if use_branch1:
        ConvBNLayer(net, from_layer, "branch1", use_bn=True, use_relu=False,
                    num_output=out2c, kernel_size=1, pad=0, stride=stride, **names)
        shortcut = f"res{block_name}_branch1"
    ConvBNLayer(net, from_layer, "branch2a", use_bn=True, use_relu=True,
                num_output=out2a, kernel_size=1, pad=0, stride=stride, **names)
    ConvBNLayer(net, f"res{block_name}_branch2a", "branch2b", use_bn=True, use_relu=True,
                num_output=out2b, kernel_size=3, pad=same_pad(3, dilation), stride=1,
                dilation=dilation, **names)
    ConvBNLayer(net, f"res{block_name}_branch2b", "branch2c", use_bn=True, use_relu=False,
                num_output=out2c, kernel_size=1, pad=0, stride=1, **names)
    res_name = f"res{block_name}"
    net[res_name] = L.Eltwise(net[shortcut], net[f"res{block_name}_branch2c"])
    net[f"{res_name}_relu"] = L.ReLU(net[res_name], in_place=True)


def InceptionTower(net, from_layer, tower_name, layer_params, **bn_param):
    """A chain of layers named ``<tower_name>/<name>``, each fed by the previous one.

    ``layer_params`` is a list of dicts with a ``name``; a name containing ``pool`` makes a
    Pooling layer from the other keys, any other name a ConvBNLayer (BatchNorm, Bias rather
    than Scale, ReLU) from ``num_output``, ``kernel_size``, ``pad``, ``stride``. The dicts are
    not modified. Returns the last layer's top.
    """
    for spec in layer_params:
        spec = dict(spec)
        name = f"{tower_name}/{spec.pop('name')}"
        if "pool" in name.rsplit("/", 1)[1]:
            require_top(net, from_layer, "InceptionTower")
            net[name] = L.Pooling(net[from_layer], **spec)
        else:
            ConvBNLayer(net, from_layer, name, use_bn=True, use_relu=True, use_scale=False,
                        **{**spec, **bn_param})
        from_layer = name
    return net[from_layer]


def CreateAnnotatedDataLayer(source, batch_size=32, backend=P.Data.LMDB, output_label=True,
                             train=True, label_map_file='', anno_type=None,
                             transform_param=None, batch_sampler=None):
    """SSD's AnnotatedData layer (named ``data``) for the TRAIN or TEST phase.

    Returns ``(data, label)`` tops, or the data top alone when ``output_label`` is False.
    ``transform_param`` defaults to none; ``batch_sampler`` to one empty sampler (the whole
    image), as SSD writes it. The layer is ``caffe_compat.data.annotated_data``.
    """
    phase = caffe_pb2.TRAIN if train else caffe_pb2.TEST
    annotated = {"label_map_file": label_map_file,
                 "batch_sampler": [{}] if batch_sampler is None else batch_sampler}
    if anno_type is not None:
        annotated["anno_type"] = anno_type
    return L.AnnotatedData(name="data", annotated_data_param=annotated,
                           data_param=dict(batch_size=batch_size, backend=backend,
                                           source=source),
                           ntop=2 if output_label else 1, include=dict(phase=phase),
                           transform_param=transform_param or {})
