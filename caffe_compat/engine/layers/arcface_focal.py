"""xialuxi/arcface-caffe's training head: its ArcFace margin CosinAddm and the softmax
FocalLoss its sample net (cosin_add_m.prototxt) trains with, zimenglan-sysu-512/Focal-Loss'
layer (docs/forks.md). Both are listed under ``loss`` in the README's layer table.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.base import Shape, register
from caffe_compat.engine.layers.face_margins import _LabelScoreLayer
from caffe_compat.engine.layers.loss import (FLT_MIN, _check_labels, _Loss, _normalization,
                                             _normalizer, _SoftmaxLoss)
from caffe_compat.proto import caffe_pb2

# The fork's backward divides by max(1 - p_t, this) where its formula has (1 - p_t)^(gamma-1).
_FOCAL_EPS = 1e-10


class _CosinAddmFunction(torch.autograd.Function):
    """arcface-caffe's CPU forward and backward at the label cosines ``x`` (one per row)."""

    @staticmethod
    def forward(ctx, flat, rows, labels, m):
        x = flat[rows, labels].clamp(max=1.0)      # the fork clamps x > 1 to 1, and stores it
        linear = x <= math.cos(math.pi - m)        # past pi - m: the fork's linear fall-back
        sin_theta = torch.sqrt((1 - x * x).clamp(min=0))
        arc = x * math.cos(m) - sin_theta * math.sin(m)
        margin = torch.where(linear, x - math.sin(math.pi - m) * m, arc)
        # d/dx cos(acos(x) + m); 1 on the linear branch and where sin(theta) is 0 (x = 1)
        safe = torch.where(sin_theta > 0, sin_theta, torch.ones_like(sin_theta))
        coeff = torch.where(linear | (sin_theta == 0), torch.ones_like(x),
                            math.cos(m) + math.sin(m) * x / safe)
        ctx.save_for_backward(rows, labels, coeff)
        return flat.index_put((rows, labels), margin)

    @staticmethod
    def backward(ctx, grad):
        rows, labels, coeff = ctx.saved_tensors
        at = (rows, labels)
        return grad.index_put(at, grad[at] * coeff), None, None, None


@register
class CosinAddm(_LabelScoreLayer):
    """xialuxi/arcface-caffe's additive angular margin: ``cosin_add_m_param { m
    transform_test }`` (m defaults to 0.5).

    Bottom 0 holds cosines, one label per sample (labels in [0, classes)). Each sample's label
    cosine x (first clamped to at most 1) becomes ``cos(acos(x) + m) = x·cos m - √(1 - x²)·sin
    m`` where ``x > cos(π - m)``, else ``x - m·sin m``; the other scores pass unchanged. Its
    diff at the label is the top's times ``cos m + sin m · x/√(1 - x²)``, or times 1 on the
    linear branch and at x = 1 (clamped ones included); elsewhere the top's diff passes. This is
    the fork's CPU build, in both phases (it reads ``transform_test`` and never uses it). Its GPU
    build differs: it skips the layer at TEST and leaves x ≥ 1 unchanged.
    """

    type = "CosinAddm"
    origin = "xialuxi/arcface-caffe"
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.m = float(param.cosin_add_m_param.m)
        self.top_shapes(bottom_shapes)

    def forward(self, scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(scores.shape), tuple(label.shape)])
        flat, labels, rows = self._flat(scores, label)
        return _CosinAddmFunction.apply(flat, rows, labels, self.m).reshape(scores.shape)


class _FocalFunction(torch.autograd.Function):
    """Sum over counted positions of ``-alpha·(1 - p_t)^gamma·log(max(p_t, FLT_MIN))`` over
    ``normalizer``, with the fork's backward (see FocalLoss)."""

    @staticmethod
    def forward(ctx, score, labels, counted, alpha, gamma, normalizer):
        logp_all = F.log_softmax(score, dim=1)                      # (outer, C, inner)
        probs = logp_all.exp()
        p_t = probs.gather(1, labels.unsqueeze(1)).squeeze(1)       # (outer, inner)
        log_pt = logp_all.gather(1, labels.unsqueeze(1)).squeeze(1).clamp(min=math.log(FLT_MIN))
        power = alpha * (1 - p_t) ** gamma
        per = torch.where(counted, -power * log_pt, torch.zeros_like(power))
        ctx.save_for_backward(probs, labels, counted, p_t, log_pt, power)
        ctx.gamma, ctx.scale = gamma, normalizer
        return per.sum() / normalizer

    @staticmethod
    def backward(ctx, grad):
        probs, labels, counted, p_t, log_pt, power = ctx.saved_tensors
        # -dFL/dp_t · p_t, with (1 - p)^(gamma-1) written as power / max(1 - p, eps)
        g = power - ctx.gamma * power / (1 - p_t).clamp(min=_FOCAL_EPS) * log_pt * p_t
        diff = g.unsqueeze(1) * probs
        diff.scatter_add_(1, labels.unsqueeze(1), -g.unsqueeze(1))   # g·(p_t - 1) at the label
        diff = diff * counted.unsqueeze(1) * (grad / ctx.scale)
        return diff, None, None, None, None, None


@register
class FocalLoss(_SoftmaxLoss):
    """The softmax focal loss of zimenglan-sysu-512/Focal-Loss (as in xialuxi/arcface-caffe and
    makefile/frcnn): ``focal_loss_param { type gamma alpha beta }`` and ``loss_param {
    ignore_label normalization normalize }``.

    Softmax along ``softmax_param.axis``; ``loss = -Σ_valid alpha·(1 - p_t)^gamma·log(max(p_t,
    FLT_MIN)) / max(1, normalizer)``, normalization as SoftmaxWithLoss (default VALID). The
    diff, as the fork's: with ``g = alpha·(1-p_t)^gamma - gamma·alpha·(1-p_t)^gamma / max(1 -
    p_t, 1e-10)·log(max(p_t, FLT_MIN))·p_t``, ``g·(p_t - 1)`` at the label and ``g·p_c``
    elsewhere, over the normalizer (0 where ignored): the exact gradient away from p_t = 1 and
    the clamp. chuanqi305/FocalLoss computes the same loss and diff. Optional top 1: the
    probabilities. ``type: LINEAR`` is refused: the fork declares it and computes ORIGIN.
    """

    type = "FocalLoss"
    origin = "zimenglan-sysu-512/Focal-Loss"
    family = "loss"
    _axis_field = "softmax axis"
    exports_to_onnx = False    # the fork's backward is a custom autograd.Function
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.focal_loss_param
        if p.type != caffe_pb2.FocalLossParameter.ORIGIN:
            raise self.error("focal_loss_param.type LINEAR is declared by the fork but not "
                             "implemented there (its layer computes ORIGIN); use type: ORIGIN")
        self.alpha, self.gamma = float(p.alpha), float(p.gamma)
        if self.gamma < 0:
            raise self.error(f"focal_loss_param.gamma must be >= 0, got {self.gamma}")
        if self.alpha <= 0:
            raise self.error(f"focal_loss_param.alpha must be > 0, got {self.alpha}")
        self.normalization = _normalization(self, _Loss.VALID)
        self.top_shapes(bottom_shapes)

    def _axis_value(self) -> int:
        return self.param.softmax_param.axis

    def forward(self, score: torch.Tensor, label: torch.Tensor):
        self._check_first_dim([tuple(score.shape), tuple(label.shape)])
        axis, outer, classes, inner = self._sizes(tuple(score.shape), tuple(label.shape))
        lab = label.detach().reshape(outer, inner).long()   # truncates, as static_cast<int>
        valid = self._valid(lab)
        _check_labels(self, lab, valid, classes)
        counted = torch.ones_like(lab, dtype=torch.bool) if valid is None else valid
        count = None if valid is None else valid.sum()
        normalizer = _normalizer(self.normalization, outer, inner, count)
        loss = _FocalFunction.apply(score.reshape(outer, classes, inner),
                                    lab.masked_fill(~counted, 0), counted, self.alpha,
                                    self.gamma, normalizer)
        return self._finish(loss, score, axis)
