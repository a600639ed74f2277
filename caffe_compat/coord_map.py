"""pycaffe's coord_map: how the spatial coordinates of two NetSpec tops relate, and ``crop``
(a Crop layer that aligns one top to another, as the FCN nets use).

A map is ``(axis, scale, shift)``: output coordinate = scale * input coordinate + shift,
per spatial axis from ``axis`` on (``axis`` None for point-wise layers, which leave
coordinates alone). Maps compose along the graph; ``coord_map_from_to`` walks back from
both tops to a common ancestor.
"""
from __future__ import annotations

import numpy as np

from caffe_compat.formats.coords import AxisMismatchException, compose, inverse
from caffe_compat.net_spec import layers as L

__all__ = ["PASS_THROUGH_LAYERS", "conv_params", "crop_params", "coord_map", "compose",
           "inverse", "coord_map_from_to", "crop", "UndefinedMapException",
           "AxisMismatchException"]

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU",
                       "Log", "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale",
                       "Sigmoid", "Split", "TanH", "Threshold"]


class UndefinedMapException(Exception):
    """The layer type has no coordinate mapping (e.g. InnerProduct)."""


def conv_params(fn):
    """(axis, stride, effective kernel extent, pad) of a Convolution/Pooling/Im2col
    Function, from ``convolution_param`` or its flat keyword arguments."""
    p = fn.params.get("convolution_param", fn.params)
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}
    if legacy & set(fn.params):
        raise AssertionError("cropping does not support legacy _h/_w params")
    kernel = np.array(p["kernel_size"], ndmin=1)
    dilation = np.array(p.get("dilation", 1), ndmin=1)
    return (p.get("axis", 1), np.array(p.get("stride", 1), ndmin=1),
            (kernel - 1) * dilation + 1, np.array(p.get("pad", 0), ndmin=1))


def crop_params(fn):
    """(axis, offsets) of a Crop Function; Caffe's defaults are axis 2 and offset 0."""
    p = fn.params.get("crop_param", fn.params)
    return p.get("axis", 2), np.array(p.get("offset", 0), ndmin=1)


def coord_map(fn):
    """The (axis, scale, shift) map of one Function, input to output."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, extent, pad = conv_params(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset        # -1: the map's axis is the last non-spatial one
    raise UndefinedMapException(fn.type_name)


def _mappable_bottoms(top):
    # A Crop layer's second bottom only gives the reference shape: its coordinates do not map.
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _maps_to_ancestors(start):
    """Every ancestor blob of ``start`` reachable through mapped layers, with its map."""
    maps = {start: (None, 1, 0)}
    frontier = [start]
    while frontier:
        top = frontier.pop()
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            maps[bottom] = compose(maps[top], step)
            frontier.append(bottom)
    return maps


def coord_map_from_to(top_from, top_to):
    """The map from ``top_from``'s coordinates to ``top_to``'s, through a common ancestor."""
    from_maps = _maps_to_ancestors(top_from)
    to_maps = {top_to: (None, 1, 0)}
    frontier = [top_to]
    while frontier:
        top = frontier.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            to_maps[bottom] = compose(to_maps[top], step)
            frontier.append(bottom)
    raise RuntimeError("Could not compute map between tops; are they connected by spatial "
                       "layers?")


def crop(top_from, top_to):
    """A Crop layer cutting ``top_from`` to ``top_to``'s extent at the aligned offset."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    if not np.all(a == 1):
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not np.all(b <= 0):
        raise AssertionError(f"cannot crop negative offset (b = {b})")
    if not np.all(np.round(b) == b):
        raise AssertionError(f"cannot crop noninteger offset (b = {b})")
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=axis + 1,       # +1: the first cropped axis
                                  offset=list(-np.round(b).astype(int))))
