"""Accuracy, and how it and SoftmaxWithLoss treat labels outside [0, C) (as a release
Caffe build does)."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
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


@register
class SegAccuracy(Layer):
    """DeepLab v2's segmentation scores (``seg_accuracy_layer.cpp``, ``confusion_matrix.cpp``).

    Every pixel whose label is not an ``ignore_label`` adds one count to a C×C confusion matrix
    at (label, predicted class), the prediction being the best-scoring class (ties: the
    highest class index, as the fork's sort of (score, class) pairs). The top ``[1, 1, 1, 3]``
    is pixel accuracy (diagonal / total, 0 when empty), mean class accuracy (over classes with
    pixels) and mean IU (intersection / union per class, 1 for a class absent from both
    labels and predictions, averaged over all C). With ``reset`` (the default) the matrix is
    cleared each forward, else it keeps counting over forwards, as the fork's does; its
    ``metric`` field changes nothing there either. A label outside [0, C) that is not ignored
    is an error, as the fork's LOG(FATAL). No gradient.
    """

    type = "SegAccuracy"
    family = "loss"
    origin = "DeepLab v2"
    num_bottoms = (2, 2)
    no_grad_bottoms = (0, 1)
    full_precision = True
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.seg_accuracy_param
        self.ignore = torch.tensor(sorted(set(p.ignore_label)), dtype=torch.long)
        self.reset = bool(p.reset)
        self.top_shapes(bottom_shapes)
        classes = bottom_shapes[0][1]
        self.confusion = torch.zeros(classes, classes, dtype=torch.long)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        try:
            score, label = (legacy_shape(tuple(s)) for s in bottom_shapes)
        except ValueError:
            score = ()
        if len(bottom_shapes[0]) < 2 or not score:
            raise self.error(f"scores {list(bottom_shapes[0])} and labels "
                             f"{list(bottom_shapes[1])} must be N×C×H×W and N×1×H×W")
        if label[1] != 1 or (score[0],) + score[2:] != (label[0],) + label[2:]:
            raise self.error(f"labels {list(label)} must be N×1×H×W for scores {list(score)}")
        return [(1, 1, 1, 3)]

    def forward(self, score: torch.Tensor, label: torch.Tensor):
        self.top_shapes([tuple(score.shape), tuple(label.shape)])
        classes = score.shape[1]
        x = score.detach().reshape(score.shape[0], classes, -1).cpu()
        # argmax taking the last of equal scores: the first maximum of the reversed classes
        pred = classes - 1 - x.flip(1).argmax(dim=1)
        gt = label.detach().reshape(pred.shape).cpu().long()    # static_cast<int>: truncation
        keep = ~torch.isin(gt, self.ignore)
        bad = keep & ((gt < 0) | (gt >= classes))
        if bool(bad.any()):
            n, pos = (int(i[0]) for i in torch.nonzero(bad, as_tuple=True))
            width = score.shape[3] if score.dim() == 4 else 1
            raise self.error(f"unexpected label {int(gt[n, pos])} (item {n}, row {pos // width}, "
                             f"column {pos % width}); labels must be in [0, {classes}) or an "
                             "ignore_label")
        if self.reset:
            self.confusion.zero_()
        pairs = gt[keep] * classes + pred[keep]
        self.confusion += torch.bincount(pairs, minlength=classes * classes).view(classes, classes)
        return torch.tensor(confusion_scores(self.confusion), dtype=score.dtype,
                            device=score.device).view(1, 1, 1, 3)


def confusion_scores(confusion: torch.Tensor) -> list[float]:
    """[accuracy, mean recall over classes with pixels, mean IU], as DeepLab's
    ConfusionMatrix accuracy(), avgRecall(false) and avgJaccard() (in double)."""
    m = confusion.double()
    diag, rows, cols, total = m.diag(), m.sum(1), m.sum(0), m.sum()
    accuracy = float(diag.sum() / total) if total > 0 else 0.0
    seen = rows > 0
    recall = float((diag[seen] / rows[seen]).mean()) if bool(seen.any()) else 0.0
    union = rows + cols - diag
    iou = torch.where(union == diag, torch.ones_like(diag), diag / union.clamp(min=1))
    return [accuracy, recall, float(iou.mean())]
