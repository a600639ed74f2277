"""Loss layers: SoftmaxWithLoss, EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss,
InfogainLoss (Accuracy is in ``accuracy.py``).

A loss layer's top 0 is a 0-d tensor (Caffe's loss blobs have shape ``()``); the net builder
applies the loss weight (default 1 for these types). Labels are float-coded integers, cast
to int by truncation like Caffe's ``static_cast<int>``; they never receive a gradient.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from caffe_compat.engine.layers.accuracy import label_sizes, labels_in_range
from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis, pack
from caffe_compat.proto import caffe_pb2

FLT_MIN = 1.17549435e-38   # std::numeric_limits<float>::min(), SoftmaxWithLoss' clamp
LOG_THRESHOLD = 1e-20      # Caffe's kLOG_THRESHOLD, InfogainLoss' clamp
_Loss = caffe_pb2.LossParameter


def _clamped_log(logp: torch.Tensor, floor: float) -> torch.Tensor:
    """``log(max(p, floor))`` from ``logp = log p``, with the gradient of ``log p`` everywhere.

    Caffe clamps only the forward value; its backward (``p - onehot``) ignores the clamp.
    Where clamped, ``logp - logp.detach()`` is exactly 0 and keeps logp's gradient.
    """
    lo = math.log(floor)
    return torch.where(logp >= lo, logp, logp - logp.detach() + lo)


def _check_labels(layer: Layer, labels: torch.Tensor, valid: torch.Tensor | None,
                  classes: int, rule: str | None = None) -> None:
    """Labels where ``valid`` (all where None) must lie in [0, classes); ``rule`` words what
    labels may be (default: the loss layers' ignore_label wording). Checked on CPU only: on
    CUDA the check would force a device sync every step (an out-of-range index there trips
    gather's device assert)."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels < 0) | (labels >= classes)
    if valid is not None:
        bad &= valid
    if bool(bad.any()):
        rule = rule or f"integers in [0, {classes}) (or the ignore_label)"
        raise layer.error(f"label {int(labels[bad][0])} is out of range: labels must be {rule}")


def refuse_pre_fixed(layer: Layer, mode: int) -> int:
    """``mode``, unless it is R-FCN's PRE_FIXED, which only its SmoothL1Loss reads (the fork's
    other loss layers abort on it as an unknown mode)."""
    if mode == _Loss.PRE_FIXED:
        raise layer.error("loss_param.normalization PRE_FIXED is only read by SmoothL1Loss "
                          "(R-FCN); use FULL, VALID, BATCH_SIZE or NONE here")
    return mode


def _normalization(layer: Layer, default: int, pre_fixed: bool = False) -> int:
    """Mode: ``normalization`` if set, else the legacy ``normalize``, else ``default``.
    PRE_FIXED is an error unless the layer reads it (``pre_fixed``)."""
    p = layer.param.loss_param
    if p.HasField("normalization"):
        return p.normalization if pre_fixed else refuse_pre_fixed(layer, p.normalization)
    if p.HasField("normalize"):
        return _Loss.VALID if p.normalize else _Loss.BATCH_SIZE
    return default


def _normalizer(mode: int, outer: int, inner: int, valid_count,
                pre_fixed: float = 1.0) -> torch.Tensor | float:
    """Caffe's get_normalizer, floored at 1. ``valid_count`` is None when nothing is ignored;
    ``pre_fixed`` is R-FCN's ``pre_fixed_normalizer`` (mode PRE_FIXED)."""
    if mode == _Loss.PRE_FIXED:
        n = pre_fixed
    elif mode == _Loss.FULL:
        n = outer * inner
    elif mode == _Loss.VALID:
        n = outer * inner if valid_count is None else valid_count
    elif mode == _Loss.BATCH_SIZE:
        n = outer
    else:  # NONE
        n = 1
    return n.clamp(min=1) if torch.is_tensor(n) else float(max(1, n))


class _LossLayer(Layer):
    """Caffe's LossLayer: two bottoms with the same first dim, a scalar top 0."""

    num_bottoms = (2, 2)
    num_tops = (1, 1)
    is_loss = True
    auto_top = True
    no_grad_bottoms = (1,)
    full_precision = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.loss_param
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None

    def _check_first_dim(self, bottom_shapes: Sequence[Shape]) -> None:
        a, b = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if not a or not b or a[0] != b[0]:
            raise self.error(f"bottom 0 {list(a)} and bottom 1 {list(b)} must have the same "
                             "first dimension")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        self._check_first_dim(bottom_shapes)
        return [()]

    def _valid(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Mask of non-ignored positions, or None when there is no ignore_label."""
        return None if self.ignore_label is None else labels != self.ignore_label


class _SoftmaxLoss(_LossLayer):
    """Shared part of SoftmaxWithLoss and InfogainLoss: softmax over an axis with labels of
    ``outer * inner`` positions, and an optional top 1 with the probabilities."""

    num_tops = (1, 2)
    _axis_field = ""
    release_labels = False   # out-of-range labels: True = release Caffe's tolerance, else error

    def _axis(self, ndim: int) -> int:
        return canonical_axis(self, self._axis_value(), ndim)

    def _axis_value(self) -> int:
        raise NotImplementedError

    def _sizes(self, shape: Shape, label_shape: Shape) -> tuple[int, int, int, int]:
        """(axis, outer, classes, inner) after checking the label count."""
        axis = self._axis(len(shape))
        return (axis, *label_sizes(self, shape, label_shape, axis, self._axis_field))

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        self._check_first_dim(bottom_shapes)
        self._sizes(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))
        return [()] + [tuple(bottom_shapes[0])] * (len(self.param.top) > 1)

    def _log_probs(self, score: torch.Tensor, label: torch.Tensor):
        """(axis, log_softmax (outer, C, inner), int labels (outer, inner), valid mask or None,
        (outer, inner))."""
        self._check_first_dim([tuple(score.shape), tuple(label.shape)])
        axis, outer, classes, inner = self._sizes(tuple(score.shape), tuple(label.shape))
        logp = F.log_softmax(score.reshape(outer, classes, inner), dim=1)
        # .long() truncates toward zero, like static_cast<int>
        lab = label.detach().reshape(outer, inner).long()
        valid = self._valid(lab)
        if self.release_labels:
            inside = labels_in_range(self, lab, valid, classes)
            return axis, logp, lab, valid, (outer, inner), inside
        _check_labels(self, lab, valid, classes)
        return axis, logp, lab, valid, (outer, inner), None

    def _finish(self, loss: torch.Tensor, score: torch.Tensor, axis: int):
        # Top 1 (probabilities) carries no gradient: Caffe's backward reads only top 0's diff.
        if len(self.param.top) > 1:
            return loss, F.softmax(score.detach(), dim=axis)
        return loss


@register
class SoftmaxWithLoss(_SoftmaxLoss):
    """Multinomial logistic loss of the softmax along ``softmax_param.axis``.

    ``loss = -sum_valid log(max(p_label, FLT_MIN)) / max(1, normalizer)``; the gradient is
    ``(p - onehot) / normalizer`` (0 at ignored positions), not clamped. Normalization:
    ``normalization`` (default VALID), else the legacy ``normalize`` (true VALID, false
    BATCH_SIZE).

    SegNet's ``loss_param { weight_by_label_freqs: true class_weighting: ... }`` multiplies
    each position's loss (and so its gradient) by its label's weight; the normalizer still
    counts positions, as in alexgkendall/caffe-segnet. Labels outside [0, C) are tolerated
    as a release build does (``accuracy.labels_in_range``). daijifeng001/caffe-rfcn's third
    top holds each position's loss ``-log(max(p_label, FLT_MIN))`` (0 where ignored), shaped
    like the labels, for BoxAnnotatorOHEM; it passes no gradient back.
    """

    type = "SoftmaxWithLoss"
    _axis_field = "softmax axis"
    release_labels = True
    num_tops = (1, 3)

    @property
    def _loss_top(self) -> bool:
        """R-FCN's third top: each position's loss, shaped like the labels."""
        return len(self.param.top) > 2

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.normalization = _normalization(self, _Loss.VALID)
        lp = param.loss_param
        weights = torch.tensor(list(lp.class_weighting), dtype=torch.float32) \
            if lp.weight_by_label_freqs else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        tops = super().top_shapes(bottom_shapes) + [tuple(bottom_shapes[1])] * self._loss_top
        classes = bottom_shapes[0][self._axis(len(bottom_shapes[0]))]
        if self.class_weights is not None and self.class_weights.numel() != classes:
            raise self.error(f"weight_by_label_freqs needs one class_weighting per class: "
                             f"{self.class_weights.numel()} given for {classes} classes")
        return tops

    def _axis_value(self) -> int:
        return self.param.softmax_param.axis

    def forward(self, score: torch.Tensor, label: torch.Tensor):
        axis, logp, lab, valid, (outer, inner), inside = self._log_probs(score, label)
        counted = inside if valid is None else valid & inside
        safe = lab.masked_fill(~counted, 0)
        picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)  # (outer, inner)
        picked = _clamped_log(picked, FLT_MIN)
        if self.class_weights is not None:
            picked = picked * self.class_weights.to(picked.dtype)[safe]
        picked = torch.where(counted, picked, 0.0)
        count = None if valid is None else valid.sum()
        loss = -picked.sum() / _normalizer(self.normalization, outer, inner, count)
        tops = self._finish(loss, score, axis)
        if self._loss_top:    # no gradient flows back from it, as in the fork
            return (*tops, -picked.detach().reshape(label.shape))
        return tops


@register
class InfogainLoss(_SoftmaxLoss):
    """``loss = -sum_valid sum_l H[label, l] * log(max(p_l, 1e-20)) / normalizer``.

    p is the softmax along ``infogain_loss_param.axis``. H (C x C) is bottom 2 or the
    BlobProto file ``infogain_loss_param.source``. Normalization as SoftmaxWithLoss (the legacy
    ``normalize`` is rejected, as in Caffe); Caffe's gradient ignores the clamp.
    """

    type = "InfogainLoss"
    num_bottoms = (2, 3)
    no_grad_bottoms = (1, 2)
    _axis_field = "infogain axis"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        if param.loss_param.HasField("normalize"):
            raise self.error('loss_param.normalize is not supported here; use "normalization"')
        self.normalization = refuse_pre_fixed(self, param.loss_param.normalization)
        if len(bottom_shapes) < 3:
            source = param.infogain_loss_param.source
            if not source:
                raise self.error("give the infogain matrix as bottom 2 or as "
                                 "infogain_loss_param.source (a BlobProto file)")
            from caffe_compat.formats.blob_io import read_blobproto
            matrix = np.ascontiguousarray(read_blobproto(source), dtype=np.float32)
            matrix = torch.from_numpy(matrix)
            self.register_buffer("infogain", matrix.reshape(-1), persistent=False)
        self.top_shapes(bottom_shapes)

    def _axis_value(self) -> int:
        return self.param.infogain_loss_param.axis

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        tops = super().top_shapes(bottom_shapes)
        classes = bottom_shapes[0][self._axis(len(bottom_shapes[0]))]
        count = math.prod(bottom_shapes[2]) if len(bottom_shapes) > 2 else self.infogain.numel()
        if count != classes * classes:
            raise self.error(f"the infogain matrix H must be {classes}x{classes} "
                             f"({classes * classes} values), got {count} values")
        return tops

    def forward(self, score: torch.Tensor, label: torch.Tensor, matrix: torch.Tensor | None = None):
        axis, logp, lab, valid, (outer, inner), _ = self._log_probs(score, label)
        classes = logp.shape[1]
        H = (self.infogain if matrix is None else matrix.detach()).reshape(classes, classes)
        safe = lab if valid is None else lab.masked_fill(~valid, 0)
        rows = H.to(logp.dtype)[safe].permute(0, 2, 1)  # H[label] per position: (outer, C, inner)
        per_pos = (rows * _clamped_log(logp, LOG_THRESHOLD)).sum(1)  # (outer, inner)
        if valid is not None:
            per_pos = torch.where(valid, per_pos, 0.0)
        count = None if valid is None else valid.sum()
        loss = -per_pos.sum() / _normalizer(self.normalization, outer, inner, count)
        return self._finish(loss, score, axis)


@register
class EuclideanLoss(_LossLayer):
    """``sum((a - b)^2) / (2 N)`` with N = shape[0]; both bottoms get a gradient."""

    type = "EuclideanLoss"
    no_grad_bottoms = ()

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        a, b = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        self._check_first_dim(bottom_shapes)
        if math.prod(a[1:]) != math.prod(b[1:]):
            raise self.error(f"bottoms must have the same size per sample: {list(a)} vs {list(b)}")
        return [()]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(a.shape), tuple(b.shape)])
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / (2 * a.shape[0])


@register
class SigmoidCrossEntropyLoss(_LossLayer):
    """Element-wise cross-entropy of ``sigmoid(x)`` against real targets in [0, 1].

    The value is Caffe's overflow-free form (the same as ``binary_cross_entropy_with_logits``),
    the gradient ``(sigmoid(x) - t) / normalizer``. Positions whose ``int(t)`` equals
    ``ignore_label`` are skipped. Normalization defaults to BATCH_SIZE when neither
    ``normalization`` nor ``normalize`` is set (not the proto's VALID).
    """

    type = "SigmoidCrossEntropyLoss"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.normalization = _normalization(self, _Loss.BATCH_SIZE)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        self._check_first_dim(bottom_shapes)
        a, b = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if math.prod(a) != math.prod(b):
            raise self.error(f"bottoms must have the same count: {list(a)} vs {list(b)}")
        return [()]

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(x.shape), tuple(target.shape)])
        t = target.detach().reshape(x.shape).to(x.dtype)
        per = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        valid = self._valid(t.long())  # int(t) compared with ignore_label, like Caffe
        count = None
        if valid is not None:
            per = torch.where(valid, per, 0.0)
            count = valid.sum()
        outer = x.shape[0]
        return per.sum() / _normalizer(self.normalization, outer, x.numel() // max(outer, 1), count)


@register
class HingeLoss(_LossLayer):
    """One-vs-all hinge loss: ``h = max(0, 1 - s * x)`` per class, s = +1 for the label and
    -1 otherwise; the loss is ``sum(h) / N`` (L1, default) or ``sum(h^2) / N`` (L2)."""

    type = "HingeLoss"

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        H = caffe_pb2.HingeLossParameter
        self.norm = param.hinge_loss_param.norm
        if self.norm not in (H.L1, H.L2):
            raise self.error(f"unknown norm {self.norm} (known: L1, L2)")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        self._check_first_dim(bottom_shapes)
        n, labels = bottom_shapes[0][0], math.prod(bottom_shapes[1])
        if labels != n:
            raise self.error(f"needs one label per sample: {n} samples but {labels} labels "
                             f"(shape {list(bottom_shapes[1])})")
        return [()]

    def forward(self, score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(score.shape), tuple(label.shape)])
        n = score.shape[0]
        x = score.reshape(n, -1)  # (N, dim): all non-batch axes are classes
        lab = label.detach().reshape(n).long()
        _check_labels(self, lab, None, x.shape[1])
        # +x for the wrong classes, -x for the true one, then the hinge max(0, 1 + .)
        sign = torch.ones_like(x).scatter_(1, lab.unsqueeze(1), -1.0)
        h = F.relu(1 + sign * x)
        if self.norm == caffe_pb2.HingeLossParameter.L2:
            h = h * h
        return h.sum() / n
