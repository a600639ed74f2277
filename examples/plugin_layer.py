"""A user's own layer type, registered from this one file (README, "Your own layers").

Importing this module registers ``ScaledTanh``: ``y = alpha_c * tanh(beta * x)`` with one
learnable ``alpha`` per channel (blob 0, saved in caffemodels like any layer's blobs) and a
fixed ``beta``. Its settings come from ``python_param.param_str`` as JSON, so the prototxt
needs no new proto field::

    layer { name: "act" type: "ScaledTanh" bottom: "x" top: "y"
            python_param { param_str: '{"alpha": 1.7159, "beta": 0.6667}' } }

Backward is autograd; a layer whose gradient must differ would use a torch.autograd.Function.
"""
from __future__ import annotations

import json

import torch

from caffe_compat.engine.layers import Layer, register

OPTIONS = {"alpha": 1.7159, "beta": 2.0 / 3.0}


@register
class ScaledTanh(Layer):
    """LeCun's scaled tanh with a learnable per-channel amplitude."""

    type = "ScaledTanh"          # the prototxt's type string
    family = "plug-in"
    origin = "examples/plugin_layer.py"
    num_bottoms = (1, 1)         # (min, max) bottoms
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        try:
            options = json.loads(param.python_param.param_str or "{}")
        except json.JSONDecodeError as exc:
            raise self.error(f"param_str is not JSON ({exc})") from None
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise self.error(f"unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
        options = {**OPTIONS, **options}
        self.beta = float(options["beta"])
        channels = bottom_shapes[0][1]
        self.add_blob(torch.full((channels,), float(options["alpha"])))

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        alpha = self.blobs[0].view(1, -1, *([1] * (x.dim() - 2)))   # read the blob every call
        return alpha * torch.tanh(self.beta * x)
