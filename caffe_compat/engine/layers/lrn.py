"""Local response normalisation (``lrn_layer.cpp``) over 4-D ``(N, C, H, W)`` bottoms.

ACROSS_CHANNELS: ``y = x * (k + alpha/n * sum_{|c'-c| <= n//2} x_{c'}^2) ** -beta`` with zero
padding over channels. ``F.local_response_norm`` computes exactly this (its average over a
zero-padded window of n channels is the sum divided by n), so it is the fast path.

WITHIN_CHANNEL: Caffe builds it from Power(x^2) -> AVE Pooling(n, pad n//2, stride 1) ->
Power(shift 1, scale alpha, power -beta) -> product with x. With stride 1 and pad n//2 every
window's Caffe divisor is n^2, so ``y = x * (1 + alpha/n^2 * window_sum(x^2)) ** -beta``;
``k`` is ignored.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import Layer, Shape, register

ACROSS_CHANNELS, WITHIN_CHANNEL = 0, 1


@register
class LRN(Layer):
    """Caffe LRN (ACROSS_CHANNELS or WITHIN_CHANNEL); ``local_size`` must be odd."""

    type = "LRN"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        lp = param.lrn_param
        self.size = lp.local_size
        if self.size % 2 == 0:
            raise self.error(f"local_size ({self.size}) must be odd")
        self.alpha, self.beta, self.k = lp.alpha, lp.beta, lp.k
        self.region = lp.norm_region
        if self.region not in (ACROSS_CHANNELS, WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region} "
                             "(known: ACROSS_CHANNELS, WITHIN_CHANNEL)")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(f"bottom must have 4 axes (num, channels, height, width), "
                             f"got shape {list(shape)}")
        return [shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region == ACROSS_CHANNELS:
            return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k)
        n = self.size
        # Mean of x^2 over the zero-padded n x n window, divisor always n^2: (N, C, H, W).
        mean_sq = F.avg_pool2d(x * x, n, stride=1, padding=n // 2, count_include_pad=True)
        return x * (1.0 + self.alpha * mean_sq).pow(-self.beta)

    def extra_repr(self) -> str:
        region = "ACROSS_CHANNELS" if self.region == ACROSS_CHANNELS else "WITHIN_CHANNEL"
        return (f"name={self.name!r}, {region}, local_size={self.size}, alpha={self.alpha}, "
                f"beta={self.beta}, k={self.k}")
