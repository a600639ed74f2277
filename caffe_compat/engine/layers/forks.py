"""Small channel-wise layers from the forks: SENet's Axpy, ShuffleNet's ShuffleChannel.

Both are listed under the ``common`` family in the README's layer table.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caffe_compat.engine.layers.base import Layer, Shape, register


@register
class Axpy(Layer):
    """hujie-frank/SENet's Axpy: ``top = a * x + y`` with ``a`` one value per (n, c).

    Bottoms: ``a [N, C]`` (or ``[N, C, 1, 1]``), ``x`` and ``y`` of one shape ``[N, C, ...]``.
    The gradients are the products' (``da = sum over space of dy * x``), as SENet's.
    """

    type = "Axpy"
    family = "common"
    origin = "hujie-frank/SENet"
    num_bottoms = (3, 3)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        a, x, y = (tuple(s) for s in bottom_shapes)
        if len(a) < 2 or len(x) < 2 or a[:2] != x[:2]:
            raise self.error(f"bottom 0 {list(a)} must be [N, C] of bottom 1 {list(x)}")
        if len(a) == 4 and a[2:] != (1, 1):
            raise self.error(f"a 4-axis bottom 0 must be [N, C, 1, 1], got {list(a)}")
        if x != y:
            raise self.error(f"bottoms 1 and 2 must have one shape, got {list(x)} and {list(y)}")
        return [x]

    def forward(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = a.reshape(a.shape[0], a.shape[1], *([1] * (x.dim() - 2)))
        return scale * x + y


@register
class ShuffleChannel(Layer):
    """farmingyard/ShuffleNet's ShuffleChannel: channel ``i·(C/g) + j`` moves to ``j·g + i``
    (``[N, g, C/g, ...]`` transposed to ``[N, C/g, g, ...]``); ``shuffle_channel_param.group``."""

    type = "ShuffleChannel"
    family = "common"
    origin = "farmingyard/ShuffleNet"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.group = int(param.shuffle_channel_param.group)
        shape = tuple(bottom_shapes[0])
        if self.group <= 0:
            raise self.error("group must be positive")
        if len(shape) < 2 or shape[1] % self.group:
            raise self.error(f"channels ({shape[1] if len(shape) > 1 else '?'}) must be a "
                             f"multiple of group ({self.group})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        rest = x.shape[2:]
        grouped = x.reshape(n, self.group, c // self.group, *rest)
        return grouped.transpose(1, 2).reshape(x.shape).contiguous()
