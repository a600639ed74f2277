"""The angular and cosine margin layers of three face-recognition forks (docs/forks.md):
happynear/caffe-windows' LabelSpecificAdd (AM-Softmax), xialuxi/arcface-caffe's CombinedMargin
and wy1iu/sphereface's MarginInnerProduct (A-Softmax).

Each reads one label per sample and changes only that sample's label score; the first two are
listed under ``loss`` in the README's layer table, MarginInnerProduct under ``inner_product``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.fillers import FillerError, fill
from caffe_compat.engine.layers.base import TRAIN, Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis
from caffe_compat.engine.layers.loss import _check_labels

_SINGLE, _DOUBLE, _TRIPLE, _QUADRUPLE = range(4)


def _label_rows(layer: Layer, label: torch.Tensor, samples: int, classes: int,
                negative_skips: bool = False) -> torch.Tensor:
    """The labels as int64 indices (truncated, as static_cast<int>), one per sample. Out of
    range is an error (the forks index memory past the row); checked on CPU only, where it
    costs no device sync."""
    if label.numel() != samples:
        raise layer.error(f"needs one label per sample: {samples} samples but {label.numel()} "
                          f"labels (shape {list(label.shape)})")
    labels = label.detach().reshape(samples).long()
    rule = f"integers in [0, {classes})"
    _check_labels(layer, labels, labels >= 0 if negative_skips else None, classes,
                  rule=f"negative (skipped) or {rule}" if negative_skips else rule)
    return labels


class _LabelScoreLayer(Layer):
    """Bottoms: scores ``[N, ...]`` (each sample's axes after the first flattened to D scores)
    and one label per sample; top 0 shaped like the scores."""

    num_bottoms = (2, 2)
    no_grad_bottoms = (1,)
    family = "loss"
    full_precision = True      # cosines near 1: acos and the margin need float32's digits
    exports_to_onnx = False
    traceable = False          # the label picks the element; schedules change per call

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        scores = tuple(bottom_shapes[0])
        if len(scores) < 2:
            raise self.error(f"bottom 0 {list(scores)} must be [N, classes, ...]")
        if math.prod(bottom_shapes[1]) != scores[0]:
            raise self.error(f"needs one label per sample: {scores[0]} samples but "
                             f"{math.prod(bottom_shapes[1])} labels (shape "
                             f"{list(bottom_shapes[1])})")
        return [scores, (1,)][:max(1, len(self.param.top))]

    def _flat(self, scores: torch.Tensor, label: torch.Tensor, negative_skips: bool = False):
        n = scores.shape[0]
        flat = scores.reshape(n, -1)
        labels = _label_rows(self, label, n, flat.shape[1], negative_skips)
        return flat, labels, torch.arange(n, device=scores.device)


@register
class LabelSpecificAdd(_LabelScoreLayer):
    """happynear/caffe-windows' AM-Softmax margin: ``label_specific_add_param { bias
    transform_test bias_base bias_gamma bias_power bias_min bias_max iteration }``.

    In TRAIN, each sample's label score s becomes ``s + bias`` where ``s > -bias`` (with the
    usual negative bias -m: cosines above m lose m, the rest stay). With ``bias_base`` set,
    every forward first takes ``bias = clip(bias_base + (1 + bias_gamma·it)^bias_power - 1,
    bias_min, bias_max)`` and then counts ``it`` up (from ``iteration``). The gradient passes
    through unchanged. In TEST the scores pass unchanged whatever ``transform_test`` says:
    the fork ANDs it with the TRAIN phase, then skips at TEST. Optional top 1 ``[1]``: the bias
    used (0 at TEST, where the fork never writes it).
    """

    type = "LabelSpecificAdd"
    origin = "happynear/caffe-windows (AM-Softmax)"
    num_tops = (1, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.label_specific_add_param
        self.bias = float(p.bias)
        self.anneal = p.HasField("bias_base")
        self.iteration = int(p.iteration)
        self.schedule = (float(p.bias_base), float(p.bias_gamma), float(p.bias_power),
                         float(p.bias_min), float(p.bias_max))
        if self.anneal and self.schedule[3] > self.schedule[4]:
            raise self.error(f"label_specific_add_param: bias_min {self.schedule[3]} > bias_max "
                             f"{self.schedule[4]} (the schedule's bias is clipped to "
                             "[bias_min, bias_max]; bias_max defaults to 0)")
        self.top_shapes(bottom_shapes)

    def _next_bias(self) -> float:
        if self.anneal:
            base, gamma, power, low, high = self.schedule
            value = base + (1.0 + gamma * self.iteration) ** power - 1.0
            self.bias = float(np.float32(min(max(value, low), high)))
            self.iteration += 1
        return self.bias

    def forward(self, scores: torch.Tensor, label: torch.Tensor):
        self.top_shapes([tuple(scores.shape), tuple(label.shape)])
        flat, labels, rows = self._flat(scores, label)
        if self.phase != TRAIN:
            top, bias = scores, 0.0
        else:
            bias = self._next_bias()
            picked = flat[rows, labels]
            shifted = torch.where(picked > -bias, picked + bias, picked)
            top = flat.index_put((rows, labels), shifted).reshape(scores.shape)
        if len(self.param.top) < 2:
            return top
        return top, torch.full((1,), bias, dtype=scores.dtype, device=scores.device)


@register
class CombinedMargin(_LabelScoreLayer):
    """xialuxi/arcface-caffe's combined margin: ``combined_margin_param { m1 m2 m3
    transform_test }`` (defaults 4, 0.5, 0.35).

    Bottom 0 holds cosines; each sample's label cosine x becomes ``cos(m1·acos(x) + m2) - m3``
    (SphereFace's m1, ArcFace's m2, CosFace's m3 in one), in both phases (the fork reads
    ``transform_test`` and never uses it); a negative label leaves its row unchanged. Its
    gradient is the exact derivative ``m1·sin(m1·acos(x) + m2) / sqrt(1 - x²)`` times the top's
    diff, as the fork's current backward; the other scores pass it through. |x| > 1 gives NaN
    and x = ±1 an infinite gradient, as in the fork (it clamps nothing).
    """

    type = "CombinedMargin"
    origin = "xialuxi/arcface-caffe"
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.combined_margin_param
        self.m1, self.m2, self.m3 = float(p.m1), float(p.m2), float(p.m3)
        self.top_shapes(bottom_shapes)

    def forward(self, scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(scores.shape), tuple(label.shape)])
        flat, labels, rows = self._flat(scores, label, negative_skips=True)
        kept = labels >= 0
        index = labels.clamp(min=0)
        picked = flat[rows, index]
        # rows without a label take acos(0): their result is discarded, and no infinite
        # derivative at ±1 leaks into their gradient through the where
        safe = torch.where(kept, picked, torch.zeros_like(picked))
        margin = torch.cos(self.m1 * torch.acos(safe) + self.m2) - self.m3
        return flat.index_put((rows, index), torch.where(kept, margin, picked)
                              ).reshape(scores.shape)


def _margin_terms(kind: int, c: torch.Tensor, x_norm: torch.Tensor):
    """For the label cosines c: sphereface's psi (the label score, ``|x|·ψ(θ)``) and the two
    coefficients of its x-diff, ``coeff_w·w + coeff_x·x`` before the fork scales them to a
    unit pair. ``ψ = (-1)^k·cos(mθ) - 2k`` with k picked by sign tests on c."""
    s0 = torch.sign(c)
    if kind == _DOUBLE:
        psi = 2 * s0 * c ** 2 - 1
        coeff_w, coeff_x = 4 * s0 * c, -(2 * s0 * c ** 2 + 1) / x_norm
    elif kind == _TRIPLE:
        s1 = torch.sign(c.abs() - 0.5)
        s2 = s0 * (1 + s1) - 2
        psi = s1 * (4 * c ** 3 - 3 * c) + s2
        coeff_w, coeff_x = s1 * (12 * c ** 2 - 3), -(8 * s1 * c ** 3 - s2) / x_norm
    else:
        s3 = s0 * torch.sign(2 * c ** 2 - 1)
        s4 = 2 * s0 + s3 - 3
        psi = s3 * (8 * c ** 4 - 8 * c ** 2 + 1) + s4
        coeff_w = s3 * (32 * c ** 3 - 16 * c)
        coeff_x = -(s3 * (24 * c ** 4 - 8 * c ** 2 - 1) - s4) / x_norm
    return psi * x_norm, coeff_w, coeff_x


class _AngularMarginFunction(torch.autograd.Function):
    """sphereface's forward and backward. Its x-diff is not the gradient: at the label the
    pair (coeff_w, coeff_x) is scaled to unit length; the weight diff is that of the plain
    ``x·Wᵀ`` (margin and row normalization ignored), as the fork's."""

    @staticmethod
    def forward(ctx, x, labels, weight, lam, kind):
        xw = x @ weight.t()
        # weight is normalized in place by the next forward: keep this call's rows
        ctx.weight, ctx.x, ctx.labels, ctx.lam, ctx.kind = weight.detach().clone(), x, labels, \
            lam, kind
        if kind == _SINGLE:
            return xw
        rows = torch.arange(x.shape[0], device=x.device)
        x_norm = torch.sqrt((x * x).sum(1))
        score, coeff_w, coeff_x = _margin_terms(kind, xw[rows, labels] / x_norm, x_norm)
        scale = torch.sqrt(coeff_w ** 2 + coeff_x ** 2)
        ctx.coeff_w, ctx.coeff_x = coeff_w / scale, coeff_x / scale
        top = xw.index_put((rows, labels), score)
        return (top + lam * xw) / (1 + lam)

    @staticmethod
    def backward(ctx, grad):
        weight, x, labels, lam = ctx.weight, ctx.x, ctx.labels, ctx.lam
        grad_x = grad @ weight
        if ctx.kind != _SINGLE:
            at_label = grad[torch.arange(x.shape[0], device=x.device), labels] / (1 + lam)
            w_label = weight[labels]
            # the label's column: lam/(1+lam)·w plus 1/(1+lam)·(coeff_w·w + coeff_x·x)
            grad_x = grad_x + at_label[:, None] * ((ctx.coeff_w - 1)[:, None] * w_label
                                                   + ctx.coeff_x[:, None] * x)
        return grad_x, None, grad.t() @ x, None, None


@register
class MarginInnerProduct(Layer):
    """wy1iu/sphereface's A-Softmax inner product: ``margin_inner_product_param { num_output
    type weight_filler axis base gamma power iteration lambda_min }``.

    Bottoms: features (axes from ``axis`` flattened to K) and one label per sample (M samples,
    the product of the axes before ``axis``). Blob 0: ``[num_output, K]`` weights, each row
    scaled to unit length in place at every forward (the stored blob changes, as the fork's).
    Every forward (both phases) first counts ``it`` up from ``iteration`` and takes ``lambda =
    max(base·(1 + gamma·it)^-power, lambda_min)``. SINGLE: ``x·Wᵀ``. DOUBLE/TRIPLE/QUADRUPLE
    (m = 2, 3, 4): the label score becomes ``(|x|·ψ(θ) + lambda·x·w)/(1 + lambda)``, the others
    stay ``x·w``. Backward as the fork's, not the exact gradient (_AngularMarginFunction).
    Optional top 1 ``[1]``: lambda.
    """

    type = "MarginInnerProduct"
    origin = "wy1iu/sphereface"
    family = "inner_product"
    num_bottoms = (2, 2)
    num_tops = (1, 2)
    no_grad_bottoms = (1,)
    full_precision = True
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.margin_inner_product_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("margin_inner_product_param.num_output must be set to the number "
                             "of classes (> 0)")
        shape = tuple(bottom_shapes[0])
        self.axis = canonical_axis(self, p.axis, len(shape), "margin_inner_product_param.axis")
        self.K = math.prod(shape[self.axis:])
        self.kind = int(p.type)
        self.iteration = float(p.iteration)
        self.schedule = (float(p.base), float(p.gamma), float(p.power), float(p.lambda_min))
        self.lam = 0.0
        try:
            weight = fill(p.weight_filler if p.HasField("weight_filler") else None,
                          (self.num_output, self.K))
        except FillerError as e:
            raise self.error(f"weight_filler: {e}") from None
        if bool((weight.norm(dim=1) == 0).any()):
            raise self.error("weight_filler gives a weight row of length 0, and each row is "
                             "divided by its length every forward (the fork's NaN); set "
                             "margin_inner_product_param.weight_filler, e.g. xavier")
        self.add_blob(weight)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        if len(shape) <= self.axis or math.prod(shape[self.axis:]) != self.K:
            raise self.error(f"bottom 0 {list(shape)} flattened from axis {self.axis} must "
                             f"have {self.K} elements")
        samples = math.prod(shape[:self.axis])
        if math.prod(bottom_shapes[1]) != samples:
            raise self.error(f"needs one label per sample: {samples} samples but "
                             f"{math.prod(bottom_shapes[1])} labels (shape "
                             f"{list(bottom_shapes[1])})")
        return [(*shape[:self.axis], self.num_output), (1,)][:max(1, len(self.param.top))]

    def _next_lambda(self) -> float:
        self.iteration += 1
        base, gamma, power, low = self.schedule
        self.lam = float(np.float32(max(base * (1.0 + gamma * self.iteration) ** -power, low)))
        return self.lam

    def forward(self, x: torch.Tensor, label: torch.Tensor):
        shapes = self.top_shapes([tuple(x.shape), tuple(label.shape)])
        lam = self._next_lambda()
        with torch.no_grad():
            blob = self.blobs[0]
            blob.div_(torch.sqrt((blob * blob).sum(1, keepdim=True)))
        flat = x.reshape(-1, self.K)
        labels = _label_rows(self, label, flat.shape[0], self.num_output)
        top = _AngularMarginFunction.apply(flat, labels, self.blobs[0].to(x.dtype), lam,
                                           self.kind).reshape(shapes[0])
        if len(shapes) < 2:
            return top
        return top, torch.full((1,), lam, dtype=x.dtype, device=x.device)
