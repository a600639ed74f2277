"""Coordinate maps between blobs, as pycaffe's coord_map.py defines them.

A map is ``(axis, scale, shift)``: output coordinate = scale * input coordinate + shift on
every spatial axis after ``axis`` (scale and shift a number or one value per spatial axis;
``axis`` None for a point-wise map, which leaves coordinates alone). pycaffe's NetSpec helper
(caffe_compat/coord_map.py) and the net builder (layers' ``coord_map``,
engine/net/fork_crop.py) compose them with the same two functions, which live here because
both sides may import this torch-free layer.
"""
from __future__ import annotations

import numpy as np

IDENTITY = (None, 1, 0)


class AxisMismatchException(Exception):
    """Two maps act on different axes and cannot be composed."""


def compose(base_map, next_map):
    """Apply ``base_map`` after ``next_map``: scales multiply, shifts scale by the base."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        axis = ax2
    elif ax2 is None or ax1 == ax2:
        axis = ax1
    else:
        raise AxisMismatchException(f"axes {ax1} and {ax2}")
    return axis, a1 * a2, a1 * b2 + b1


def inverse(map_):
    """The output-to-input map."""
    axis, a, b = map_
    return axis, 1 / a, -b / a


def window_map(axis, stride, extent, pad):
    """The map of a sliding window (kernel ``extent`` = dilation·(kernel-1)+1, per spatial
    axis): output pixel i is centred on input ``stride·i + (extent-1)/2 - pad``. That is a
    Deconvolution's map; a Convolution's or Pooling's is its inverse."""
    stride, extent, pad = (np.asarray(v, dtype=np.float64) for v in (stride, extent, pad))
    return axis, stride, (extent - 1) / 2 - pad
