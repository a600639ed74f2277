"""Accuracy, and how it and SoftmaxWithLoss treat labels outside [0, C) (as a release
Caffe build does)."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.common import canonical_axis, pack

log = logging.getLogger(__name__)


def labels_in_range(layer: Layer, labels: torch.Tensor, valid: torch.Tensor | None,
                     classes: int) -> torch.Tensor:
    """Where ``labels`` lie in [0, classes), for SoftmaxWithLoss and Accuracy.

    Caffe checks the range only in debug builds (DCHECK); a release build counts such a
    position as valid and indexes outside its scores: SegNet's void label 11 of 11 CamVid
    classes trains and tests that way. Here the position is counted too (normalizer,
    Accuracy's denominator) but adds no loss, no gradient and is never correct -- what
    SegNet's fork and Caffe's Accuracy before 2017 compute, which compare class ids -- and
    the first such label is logged once per layer (checked on the CPU only: on CUDA the check
    would synchronise every step)."""
    inside = (labels >= 0) & (labels < classes)
    if labels.device.type == "cpu" and not getattr(layer, "_told_label_range", False):
        bad = ~inside if valid is None else ~inside & valid
        if bool(bad.any()):
            layer._told_label_range = True
            log.warning("layer '%s' (%s): label %d is outside [0, %d) and is not the "
                        "ignore_label; counted as a position with no loss and no correct "
                        "prediction, as a release Caffe build runs it (this is said once)",
                        layer.name, layer.type, int(labels[bad][0]), classes)
    return inside


def label_sizes(layer: Layer, shape: Shape, label_shape: Shape, axis: int,
                axis_name: str) -> tuple[int, int, int]:
    """(outer, classes, inner) of scores ``shape`` with the classes on ``axis``, for Accuracy
    and the softmax losses; the layer's error unless there is one label per position."""
    outer, classes, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    if outer * inner != math.prod(label_shape):
        raise layer.error(
            f"number of labels ({math.prod(label_shape)}, shape {list(label_shape)}) must "
            f"match number of predictions ({outer * inner}): with {axis_name} {axis} and "
            f"prediction shape {list(shape)}, labels must count outer*inner = "
            f"{outer}*{inner}, with integer values in [0, {classes})")
    return outer, classes, inner


@register
class Accuracy(Layer):
    """Top-k accuracy; optional top 1 holds the accuracy per class. No gradient.

    A position is correct when fewer than ``top_k`` classes score >= the true class's score
    (the true class counts itself, so ties count against). Ignored labels are skipped; the
    result is correct / counted (0 when nothing is counted). A label outside [0, C) is
    counted and never correct, as a release build runs it (``labels_in_range``).
    """

    type = "Accuracy"
    family = "loss"
    num_bottoms = (2, 2)
    num_tops = (1, 2)
    no_grad_bottoms = (0, 1)
    full_precision = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.accuracy_param
        self.top_k = p.top_k
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None
        self.top_shapes(bottom_shapes)

    def _sizes(self, shape: Shape, label_shape: Shape) -> tuple[int, int, int]:
        axis = canonical_axis(self, self.param.accuracy_param.axis, len(shape))
        if self.top_k > shape[axis]:
            raise self.error(f"top_k ({self.top_k}) must not exceed the number of classes "
                             f"({shape[axis]})")
        return label_sizes(self, shape, label_shape, axis, "label axis")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        _, classes, _ = self._sizes(shape, tuple(bottom_shapes[1]))
        return [()] + [(classes,)] * (len(self.param.top) > 1)

    def forward(self, score: torch.Tensor, label: torch.Tensor):
        outer, classes, inner = self._sizes(tuple(score.shape), tuple(label.shape))
        x = score.detach().reshape(outer, classes, inner)
        lab = label.detach().reshape(outer, inner).long()
        valid = torch.ones_like(lab, dtype=torch.bool) if self.ignore_label is None \
            else lab != self.ignore_label
        inside = labels_in_range(self, lab, valid, classes)
        safe = lab.masked_fill(~(valid & inside), 0)
        true_score = x.gather(1, safe.unsqueeze(1))  # (outer, 1, inner)
        better = (x >= true_score).sum(1) - 1        # other classes scoring >= the true one
        correct = valid & inside & (better < self.top_k)
        dtype = score.dtype
        count = valid.sum()
        acc = correct.sum().to(dtype) / count.clamp(min=1).to(dtype)  # 0 when nothing counted
        if len(self.param.top) < 2:
            return acc
        seen = torch.bincount(lab[valid & inside], minlength=classes)
        hits = torch.bincount(lab[correct], minlength=classes)
        per_class = hits.to(dtype) / seen.clamp(min=1).to(dtype)  # 0 for unseen classes
        return pack([acc, per_class])
