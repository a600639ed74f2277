"""Two training layers from the forks: caffe-face's CenterLoss and R-FCN's BoxAnnotatorOHEM.

Both are listed under ``loss`` in the README's layer table.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.fillers import FillerError, fill
from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.engine.layers.common import canonical_axis
from caffe_compat.engine.layers.loss import _check_labels, _LossLayer
from caffe_compat.engine.layers.stl_sort import sort_descending


class _CenterLossFunction(torch.autograd.Function):
    """Loss ``Σ ||x_i - c_{y_i}||² / (2 M)``; backward gives the features their gradient and the
    centers caffe-face's update direction in place of theirs."""

    @staticmethod
    def forward(ctx, features, labels, centers):
        distance = features - centers[labels]                  # (M, K)
        ctx.save_for_backward(distance, labels)
        ctx.num_centers = centers.shape[0]
        return (distance * distance).sum() / features.shape[0] / 2

    @staticmethod
    def backward(ctx, grad):
        distance, labels = ctx.saved_tensors
        grad_features = distance * (grad / distance.shape[0])
        # caffe-face's center diff, read by the solver as it is: for class j,
        # Σ_{y_i = j} (c_j - x_i) / (1 + n_j). It ignores the top's diff (the loss_weight).
        variation = torch.zeros(ctx.num_centers, distance.shape[1], dtype=distance.dtype,
                                device=distance.device).index_add_(0, labels, -distance)
        counts = torch.bincount(labels, minlength=ctx.num_centers).to(distance.dtype)
        grad_centers = variation * (1 / (counts + 1))[:, None]
        return grad_features, None, grad_centers


@register
class CenterLoss(_LossLayer):
    """ydwen/caffe-face's CenterLoss: ``center_loss_param { num_output center_filler axis }``.

    Bottoms: features (the axes from ``axis`` on flattened to K per sample; M = the first
    axis) and one label per sample. Blob 0 holds the ``[num_output, K]`` centers. The loss is
    ``Σ_i ||x_i - c_{y_i}||² / (2 M)``, the features' gradient ``(x_i - c_{y_i}) · w / M``
    (w the top's diff: the loss_weight). The centers' diff is not their gradient but the
    fork's update direction ``Σ_{y_i = j} (c_j - x_i) / (1 + n_j)`` (n_j the samples of class
    j), independent of the loss_weight; the solver applies it with the layer's lr_mult and
    decay_mult like any diff. Diffs of several passes (``iter_size``) add up, as in the
    fork's CPU build (its GPU build keeps only the last pass's).
    """

    type = "CenterLoss"
    origin = "ydwen/caffe-face"
    family = "loss"
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.center_loss_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error("center_loss_param.num_output must be set to the number of "
                             "classes (> 0)")
        shape = tuple(bottom_shapes[0])
        self.axis = canonical_axis(self, p.axis, len(shape), "center_loss_param.axis")
        self.K = math.prod(shape[self.axis:])
        try:
            centers = fill(p.center_filler if p.HasField("center_filler") else None,
                           (self.num_output, self.K))
        except FillerError as e:
            raise self.error(f"center_filler: {e}") from None
        self.add_blob(centers)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        self._check_first_dim(bottom_shapes)
        shape, labels = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if math.prod(shape[:self.axis]) != shape[0] or math.prod(shape[self.axis:]) != self.K:
            raise self.error(f"bottom 0 {list(shape)} must be [M, ...] with the axes from "
                             f"center_loss_param.axis ({self.axis}) holding {self.K} values")
        if math.prod(labels) != shape[0]:
            raise self.error(f"needs one label per sample: {shape[0]} samples but "
                             f"{math.prod(labels)} labels (shape {list(labels)})")
        return [()]

    def forward(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(features.shape), tuple(label.shape)])
        m = features.shape[0]
        labels = label.detach().reshape(m).long()      # truncates, as static_cast<int>
        _check_labels(self, labels, None, self.num_output)
        centers = self.blobs[0]
        return _CenterLossFunction.apply(features.reshape(m, self.K), labels,
                                         centers.to(features.dtype))


@register
class BoxAnnotatorOHEM(Layer):
    """daijifeng001/caffe-rfcn's online hard example mining: ``box_annotator_ohem_param
    { roi_per_img ignore_label }``.

    Bottoms: RoIs ``[R, 5, H, W]`` (column 0 the image index), the per-RoI loss
    ``[R, 1, H, W]``, the labels ``[R, 1, H, W]`` and the box-regression weights
    ``[R, B, H, W]`` (fewer axes read as Caffe's num/channels/height/width, so ``[R, 5]`` and
    ``[R]`` do). All RoIs are sorted by loss, highest first, with libstdc++'s ``std::sort`` (the
    fork's; equal losses end in its order), then walked in that order: a RoI whose image has
    not yet kept ``roi_per_img`` keeps its label and weights. Tops: the labels, the others
    set to ``ignore_label`` (``[R, 1, H, W]``), and the weights, the others 0
    (``[R, B, H, W]``). No gradient, as the fork. The fork counts images by reading the
    first R·H·W image indices in steps that assume H·W = 1; here every RoI's index counts.
    """

    type = "BoxAnnotatorOHEM"
    family = "loss"
    origin = "daijifeng001/caffe-rfcn"
    num_bottoms = (4, 4)
    num_tops = (2, 2)
    no_grad_bottoms = (0, 1, 2, 3)
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.box_annotator_ohem_param
        self.roi_per_img = int(p.roi_per_img)
        if self.roi_per_img <= 0:
            raise self.error("box_annotator_ohem_param.roi_per_img must be set and > 0")
        self.ignore_label = float(p.ignore_label)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        if any(len(s) > 4 for s in bottom_shapes):
            raise self.error("bottoms must have at most 4 axes")
        rois, loss, labels, weights = (legacy_shape(tuple(s)) for s in bottom_shapes)
        n, _, h, w = rois
        if rois[1] != 5:
            raise self.error(f"bottom 0 (rois) must be [R, 5, H, W], got {list(bottom_shapes[0])}")
        for i, dims in ((1, loss), (2, labels)):
            if dims != (n, 1, h, w):
                raise self.error(f"bottom {i} {list(bottom_shapes[i])} must be [{n}, 1, {h}, {w}]")
        if (weights[0], weights[2], weights[3]) != (n, h, w):
            raise self.error(f"bottom 3 {list(bottom_shapes[3])} must be [{n}, B, {h}, {w}]")
        return [(n, 1, h, w), (n, weights[1], h, w)]

    @torch.no_grad()
    def forward(self, rois, loss, labels, weights):
        top_labels, top_weights = self.top_shapes([tuple(b.shape) for b in
                                                   (rois, loss, labels, weights)])
        n, _, h, w = top_labels
        # per RoI position (R·H·W, in the blob's order): image index, loss, label, weights
        images = rois.reshape(n, 5, h * w)[:, 0].reshape(-1).float().cpu().numpy()
        keep = torch.from_numpy(self._hardest(images.astype(np.int64),
                                              loss.reshape(-1).float().cpu().numpy()))
        keep = keep.to(labels.device)
        out_labels = torch.where(keep, labels.reshape(-1),
                                 torch.full_like(labels.reshape(-1), self.ignore_label))
        per_roi = weights.reshape(n, -1, h * w)
        out_weights = torch.where(keep.view(n, 1, h * w), per_roi, torch.zeros_like(per_roi))
        return out_labels.reshape(top_labels), out_weights.reshape(top_weights)

    def _hardest(self, images: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """Mask of the RoIs kept: per image the first ``roi_per_img`` in std::sort's order."""
        if images.size and images.min() < 0:
            raise self.error(f"a RoI has a negative image index ({images.min()})")
        left = np.full(int(images.max()) + 1 if images.size else 0, self.roi_per_img)
        keep = np.zeros(images.size, dtype=bool)
        for index in sort_descending(losses):
            image = images[index]
            if left[image] > 0:
                left[image] -= 1
                keep[index] = True
        return keep
