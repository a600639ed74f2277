"""SSD's detection head: per-source-layer location / confidence predictors and prior boxes,
concatenated into ``mbox_loc``, ``mbox_conf``, ``mbox_priorbox`` (``mbox_objectness``)."""
from __future__ import annotations

import numbers

from caffe_compat.net_spec import layers as L

from caffe_compat._model_libs.blocks import ConvBNLayer, require_top


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_lengths(from_layers, **per_layer) -> None:
    for name, values in per_layer.items():
        if values and len(values) != len(from_layers):
            raise ValueError(f"CreateMultiBoxHead: {name} has {len(values)} entries, "
                             f"from_layers {len(from_layers)}; give one per source layer")


def priors_per_location(min_size: list, max_size: list, aspect_ratio: list, flip: bool) -> int:
    """Boxes per feature-map cell as SSD's head counts them: for each min size one square,
    one square of side sqrt(min*max) when max sizes are given, one box per aspect ratio
    and, with ``flip``, one per reciprocal ratio. (The PriorBox layer drops a ratio of 1 or
    a repeated one; SSD's settings never give such ratios.)"""
    per_size = 1 + (1 if max_size else 0) + len(aspect_ratio) * (2 if flip else 1)
    return per_size * len(min_size)


def _predictor(net, from_layer: str, name: str, num_output: int, conv: dict) -> object:
    """A convolution ``name`` predicting ``num_output`` values per cell, permuted to
    N x H x W x C (``<name>_perm``) and flattened (``<name>_flat``): cell-major order, so
    that concatenating source layers keeps each prior's values together."""
    ConvBNLayer(net, from_layer, name, use_relu=False, num_output=num_output, stride=1, **conv)
    net[f"{name}_perm"] = L.Permute(net[name], order=[0, 2, 3, 1])
    net[f"{name}_flat"] = L.Flatten(net[f"{name}_perm"], axis=1)
    return net[f"{name}_flat"]


def CreateMultiBoxHead(net, data_layer="data", num_classes=None, from_layers=None,
                       use_objectness=False, normalizations=None, use_batchnorm=True,
                       lr_mult=1, use_scale=True, min_sizes=None, max_sizes=None,
                       prior_variance=None, aspect_ratios=None, steps=None, img_height=0,
                       img_width=0, share_location=True, flip=True, clip=True, offset=0.5,
                       inter_layer_depth=None, kernel_size=1, pad=0, conf_postfix='',
                       loc_postfix='', **bn_param):
    """Add SSD's multibox head over ``from_layers`` and return its tops
    ``[mbox_loc, mbox_conf, mbox_priorbox]`` (+ ``mbox_objectness`` with ``use_objectness``).

    For each source layer ``s`` (per-layer lists are indexed alongside ``from_layers``):

    * ``normalizations[i] != -1``: ``s_norm``, an L2 Normalize (per position, per-channel
      scale initialised to that value), which then stands for ``s`` below;
    * ``inter_layer_depth[i] > 0``: ``s_inter``, a 3x3 convolution with ReLU;
    * ``s_mbox_loc<loc_postfix>``: 4 offsets per prior (times ``num_classes`` without
      ``share_location``), ``s_mbox_conf<conf_postfix>``: ``num_classes`` scores per prior,
      each a ``kernel_size``/``pad`` convolution (BatchNorm when ``use_batchnorm``) with
      ``_perm`` and ``_flat`` layers;
    * ``s_mbox_priorbox``: a PriorBox on ``s`` and ``data_layer`` with ``min_sizes[i]``,
      ``max_sizes[i]``, ``aspect_ratios[i]`` (and ``flip``), ``steps[i]``, ``clip``,
      ``prior_variance`` (default ``[0.1]``), ``offset``, and ``img_size`` (or
      ``img_h``/``img_w``) when ``img_height`` and ``img_width`` are non-zero.

    The per-layer outputs are concatenated (priors along axis 2, the rest along axis 1).
    ``bn_param`` goes to each :func:`ConvBNLayer`, as do ``lr_mult`` and ``use_scale``.
    """
    from_layers = list(from_layers or [])
    normalizations, min_sizes = normalizations or [], min_sizes or []
    max_sizes, aspect_ratios, steps = max_sizes or [], aspect_ratios or [], steps or []
    inter_layer_depth = inter_layer_depth or []
    if (not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool)
            or num_classes <= 0):
        raise ValueError(f"CreateMultiBoxHead: num_classes must be a positive integer "
                         f"(background included), got {num_classes!r}")
    if len(min_sizes) != len(from_layers):
        raise ValueError(f"CreateMultiBoxHead: min_sizes has {len(min_sizes)} entries, "
                         f"from_layers {len(from_layers)}; give one per source layer")
    _check_lengths(from_layers, normalizations=normalizations, max_sizes=max_sizes,
                   aspect_ratios=aspect_ratios, steps=steps,
                   inter_layer_depth=inter_layer_depth)
    require_top(net, data_layer, "CreateMultiBoxHead (data_layer)")
    conv = dict(use_bn=use_batchnorm, lr_mult=lr_mult, use_scale=use_scale,
                kernel_size=kernel_size, pad=pad, **bn_param)
    outputs = {"loc": [], "conf": [], "priorbox": [], "objectness": []}
    for i, source in enumerate(from_layers):
        require_top(net, source, "CreateMultiBoxHead (from_layers)")
        if normalizations and normalizations[i] != -1:
            net[f"{source}_norm"] = L.Normalize(
                net[source], across_spatial=False, channel_shared=False,
                scale_filler=dict(type="constant", value=normalizations[i]))
            source = f"{source}_norm"
        if inter_layer_depth and inter_layer_depth[i] > 0:
            ConvBNLayer(net, source, f"{source}_inter", use_bn=use_batchnorm, use_relu=True,
                        lr_mult=lr_mult, num_output=inter_layer_depth[i], kernel_size=3,
                        pad=1, stride=1, use_scale=use_scale, **bn_param)
            source = f"{source}_inter"

        min_size = _as_list(min_sizes[i])
        max_size = _as_list(max_sizes[i]) if i < len(max_sizes) else []
        aspect_ratio = _as_list(aspect_ratios[i]) if i < len(aspect_ratios) else []
        if max_size and len(max_size) != len(min_size):
            raise ValueError(f"CreateMultiBoxHead: layer '{from_layers[i]}' has "
                             f"{len(min_size)} min sizes but {len(max_size)} max sizes")
        priors = priors_per_location(min_size, max_size, aspect_ratio, flip)

        loc_outputs = priors * 4 * (1 if share_location else num_classes)
        outputs["loc"].append(_predictor(net, source, f"{source}_mbox_loc{loc_postfix}",
                                         loc_outputs, conv))
        outputs["conf"].append(_predictor(net, source, f"{source}_mbox_conf{conf_postfix}",
                                          priors * num_classes, conv))

        prior = dict(min_size=min_size, clip=clip, offset=offset,
                     variance=list(prior_variance) if prior_variance else [0.1])
        if max_size:
            prior["max_size"] = max_size
        if aspect_ratio:
            prior.update(aspect_ratio=aspect_ratio, flip=flip)
        if i < len(steps) and steps[i]:
            prior["step"] = steps[i]
        if img_height and img_width:
            prior.update(dict(img_size=img_height) if img_height == img_width
                         else dict(img_h=img_height, img_w=img_width))
        net[f"{source}_mbox_priorbox"] = L.PriorBox(net[source], net[data_layer], **prior)
        outputs["priorbox"].append(net[f"{source}_mbox_priorbox"])

        if use_objectness:
            outputs["objectness"].append(_predictor(
                net, source, f"{source}_mbox_objectness", priors * 2, conv))

    heads = [("mbox_loc", "loc", 1), ("mbox_conf", "conf", 1), ("mbox_priorbox", "priorbox", 2)]
    if use_objectness:
        heads.append(("mbox_objectness", "objectness", 1))
    for name, key, axis in heads:
        net[name] = L.Concat(*outputs[key], axis=axis)
    return [net[name] for name, _, _ in heads]
