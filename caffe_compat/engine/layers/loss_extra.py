"""Loss layers beyond ``loss.py``: BVLC's ContrastiveLoss and MultinomialLogisticLoss, and
Fast R-CNN's (and R-FCN's) SmoothL1Loss.

The BVLC two reproduce Caffe's backward where it is not the derivative of its forward (the
``1e-4`` in ContrastiveLoss' distance, the clamped probability in MultinomialLogisticLoss):
the forward value is computed as usual and the gradient enters through a linear surrogate
``g·(x - x.detach())``, which adds 0 to the value and exactly ``g`` to the gradient.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Shape, register
from caffe_compat.engine.layers.loss import (LOG_THRESHOLD, _Loss, _check_labels, _LossLayer,
                                             _normalization, _normalizer)


def _with_gradient(value: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` (no gradient of its own) whose gradient w.r.t. ``x`` is ``grad``."""
    return value.detach() + (grad.detach() * (x - x.detach())).sum()


@register
class ContrastiveLoss(_LossLayer):
    """Caffe ContrastiveLoss over pairs (a, b) with similarity y (bottom 2)::

        loss = 1/(2N) Σ [ y d² + (1 - y) max(margin - d, 0)² ],  d = ‖a - b‖
        legacy_version: the dissimilar term is max(margin - d², 0)

    Caffe's gradient for a dissimilar pair (non-legacy) is ``-(margin-d)/(d + 1e-4) (a-b)/N``.
    """

    type = "ContrastiveLoss"
    num_bottoms = (3, 3)
    no_grad_bottoms = (2,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        cp = param.contrastive_loss_param
        self.margin, self.legacy = float(cp.margin), cp.legacy_version
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        a, b, y = (tuple(s) for s in bottom_shapes)
        if a != b or len(a) < 2 or math.prod(a[2:]) != 1:
            raise self.error(f"bottoms 0 and 1 must both be (N, C[, 1, 1]); got {list(a)} and "
                             f"{list(b)}")
        if math.prod(y) != a[0]:
            raise self.error(f"bottom 2 (similarity) needs {a[0]} values, got shape {list(y)}")
        return [()]

    def forward(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        diff = (a - b).reshape(n, -1)
        dist_sq = (diff * diff).sum(1)
        similar = y.detach().reshape(-1).long() != 0       # static_cast<int>(y) != 0
        with torch.no_grad():
            if self.legacy:
                mdist = self.margin - dist_sq
                dissimilar = mdist.clamp(min=0)
                coeff = torch.full_like(dist_sq, -1.0)
            else:
                dist = dist_sq.sqrt()
                mdist = self.margin - dist
                dissimilar = mdist.clamp(min=0) ** 2
                coeff = -mdist / (dist + 1e-4)
            per_pair = torch.where(similar, dist_sq, dissimilar)
            coeff = torch.where(similar, torch.ones_like(coeff),
                                torch.where(mdist > 0, coeff, torch.zeros_like(coeff)))
        loss = per_pair.sum() / n / 2
        return _with_gradient(loss, diff, coeff[:, None] * diff / n)


@register
class MultinomialLogisticLoss(_LossLayer):
    """``-1/N Σ log(max(p[n, label_n], 1e-20))`` on probabilities (N, C, ...) flattened per
    sample; Caffe's gradient at the label is ``-1 / (N max(p, 1e-20))``, also where clamped."""

    type = "MultinomialLogisticLoss"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        self._check_first_dim(bottom_shapes)
        if math.prod(bottom_shapes[1][1:]) != 1:
            raise self.error(f"bottom 1 (labels) must hold one label per sample, got shape "
                             f"{list(bottom_shapes[1])}")
        return [()]

    def forward(self, prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        n = prob.shape[0]
        flat = prob.reshape(n, -1)
        lab = label.detach().reshape(-1).long()
        _check_labels(self, lab, None, flat.shape[1])
        picked = flat.gather(1, lab[:, None]).reshape(-1)
        clamped = picked.detach().clamp(min=LOG_THRESHOLD)
        loss = -torch.log(clamped).sum() / n
        return _with_gradient(loss, picked, -1.0 / (n * clamped))


@register
class SmoothL1Loss(_LossLayer):
    """The box regression loss of rbgirshick/caffe-fast-rcnn and daijifeng001/caffe-rfcn over
    ``d = w_in · (pred - target)``::

        loss = Σ w_out · f(d) / N,  f(d) = 0.5 (σ d)² if |d| < 1/σ², else |d| - 0.5/σ²

    Fast R-CNN: optional inside/outside weights as bottoms 2 and 3 (both or neither), N the
    batch size (bottom 0's first axis); its backward is the exact derivative, so autograd
    gives it. R-FCN (σ = 1): three bottoms (inside weights only), N from ``loss_param``
    (FULL/VALID: N·H·W, BATCH_SIZE: N, PRE_FIXED: ``pre_fixed_normalizer``, NONE: 1; at
    least 1); its backward leaves out the inside weights' factor (the same for 0/1 weights,
    kept here), and an optional top 1 holds each RoI's loss summed over channels,
    ``[N, 1, H, W]``, with no gradient back. With neither ``normalization`` nor ``normalize``
    set N is the batch size (Fast R-CNN; R-FCN's VALID default differs only where
    H·W > 1). Like both forks, the target (bottom 1) receives the opposite gradient.
    """

    type = "SmoothL1Loss"
    origin = "rbgirshick/caffe-fast-rcnn"
    family = "loss"
    num_bottoms = (2, 4)
    num_tops = (1, 2)
    no_grad_bottoms = (2, 3)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        sigma = np.float32(param.smooth_l1_loss_param.sigma)
        self.sigma2 = float(sigma * sigma)              # the fork's float sigma2_
        if self.sigma2 <= 0:
            raise self.error(f"smooth_l1_loss_param.sigma must be non-zero, got {sigma:g}")
        self.normalization = _normalization(self, _Loss.BATCH_SIZE, pre_fixed=True)
        self.pre_fixed = float(param.loss_param.pre_fixed_normalizer)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        first = tuple(bottom_shapes[0])
        for i, shape in enumerate(bottom_shapes[1:], start=1):
            if math.prod(shape) != math.prod(first) or tuple(shape[:1]) != first[:1]:
                raise self.error(f"bottom {i} {list(shape)} must match bottom 0 {list(first)}")
        n, _, h, w = (tuple(first) + (1,) * 4)[:4]
        return [()] + [(n, 1, h, w)] * (len(self.param.top) > 1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                inside: torch.Tensor | None = None, outside: torch.Tensor | None = None):
        d = pred - target.reshape(pred.shape)
        if inside is not None:
            weighted = d * inside.detach().reshape(pred.shape)
            # R-FCN's gradient is f'(d), not w_in·f'(d): the weights enter the value only
            d = weighted if outside is not None else d + (weighted - d).detach()
        small = d.abs() < 1.0 / self.sigma2
        err = torch.where(small, 0.5 * d * d * self.sigma2, d.abs() - 0.5 / self.sigma2)
        if outside is not None:
            err = err * outside.detach().reshape(pred.shape)
        n, _, h, w = (tuple(pred.shape) + (1,) * 4)[:4]
        normalizer = _normalizer(self.normalization, n, h * w, None, self.pre_fixed)
        loss = err.sum() / normalizer
        if len(self.param.top) > 1:
            per_roi = err.detach().reshape(n, -1, h * w).sum(1).reshape(n, 1, h, w)
            return loss, per_roi
        return loss
