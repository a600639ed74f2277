"""Faster R-CNN's region proposal layer as a C++ type (``type: "Proposal"``, ``proposal_param``),
the form OpenCV's dnn Caffe importer and the C++ Faster R-CNN forks define, computing what
rbgirshick/py-faster-rcnn's Python ``ProposalLayer`` (lib/rpn/proposal_layer.py) computes.

Everything runs in float64 on the float32 bottoms, as the Python layer does, and the rois are
rounded to float32 at the end.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.ssd_detection import greedy_nms

# py-faster-rcnn's anchor set when the prototxt lists no ratio / scale (generate_anchors).
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
DEFAULT_SCALES = (8.0, 16.0, 32.0)


def base_anchors(base_size: int, ratios: Sequence[float], scales: Sequence[float]) -> np.ndarray:
    """``[A, 4]`` corner anchors around the cell at the origin, ratio-major then scale: the
    square ``[0, 0, base-1, base-1]`` reshaped to each ratio at about the same area (sides
    rounded with numpy's half-to-even, as generate_anchors.py; OpenCV rounds halves up), then
    scaled, keeping its centre ``(base-1)/2``."""
    centre = 0.5 * (base_size - 1)
    rows = []
    for ratio in ratios:
        width = np.round(np.sqrt(base_size * base_size / ratio))
        height = np.round(width * ratio)
        for scale in scales:
            half_w, half_h = 0.5 * (width * scale - 1), 0.5 * (height * scale - 1)
            rows.append([centre - half_w, centre - half_h, centre + half_w, centre + half_h])
    return np.asarray(rows, dtype=np.float64)


def apply_deltas(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """bbox_transform_inv: sizes ``x2 - x1 + 1``, centres ``x1 + size/2``; the moved box is
    ``centre ± size/2`` (no ``- 1`` on the way back, as py-faster-rcnn)."""
    size = anchors[:, 2:] - anchors[:, :2] + 1.0
    centre = anchors[:, :2] + 0.5 * size
    new_centre = deltas[:, :2] * size + centre
    new_size = np.exp(deltas[:, 2:]) * size
    return np.concatenate([new_centre - 0.5 * new_size, new_centre + 0.5 * new_size], axis=1)


def overlaps_plus_one(kept: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``[A, B]`` IoU of pixel boxes whose sides count both ends (``x2 - x1 + 1``), as
    py-faster-rcnn's nms."""
    k, c = kept[:, None, :], candidates[None, :, :]
    inter_w = np.maximum(0.0, np.minimum(k[..., 2], c[..., 2]) - np.maximum(k[..., 0], c[..., 0]) + 1)
    inter_h = np.maximum(0.0, np.minimum(k[..., 3], c[..., 3]) - np.maximum(k[..., 1], c[..., 1]) + 1)
    inter = inter_w * inter_h

    def area(b):
        return (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)

    return inter / (area(k) + area(c) - inter)


@register
class Proposal(Layer):
    """Region proposals from an RPN (``proposal_param``: feat_stride, base_size, min_size,
    ratio*, scale*, pre_nms_topn, post_nms_topn, nms_thresh).

    Bottoms: rpn_cls_prob_reshape ``[N, 2A, H, W]`` (the second A channels are the object
    scores), rpn_bbox_pred ``[N, 4A, H, W]`` and im_info ``[N, 3]`` (height, width, scale),
    A = ratios × scales. Per image: the base anchors (``base_anchors``) shifted by
    ``feat_stride`` over the grid in (row, column, anchor) order, moved by the deltas
    (``apply_deltas``), clipped to ``[0, width-1] × [0, height-1]``, those with a side (``+1``)
    under ``min_size · im_info[2]`` dropped, sorted by score (ties: grid order), the best
    ``pre_nms_topn`` kept (0: all), greedy NMS dropping a box whose ``+1`` IoU with a kept one
    is above ``nms_thresh``, the first ``post_nms_topn`` kept (0: all). Top 0: rois ``[R, 5]``
    ``[image, x1, y1, x2, y2]``; top 1 (optional): their scores ``[R, 1]``. R may be 0.

    The Python layer takes one image; images of a batch are done one after another here,
    each with its own im_info row and index. OpenCV's Proposal skips the min_size filter and
    pads the rois to post_nms_topn rows with zeros; otherwise it gives these rows. No backward
    (the fork's and the Python layer's do nothing).
    """

    type = "Proposal"
    origin = "Faster R-CNN C++ forks, OpenCV dnn"
    num_bottoms = (3, 3)
    num_tops = (1, 2)
    no_grad_bottoms = (0, 1, 2)
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.proposal_param
        self.stride, self.min_size = int(p.feat_stride), int(p.min_size)
        self.pre_top, self.post_top = int(p.pre_nms_topn), int(p.post_nms_topn)
        self.nms_thresh = float(p.nms_thresh)
        ratios = list(p.ratio) or list(DEFAULT_RATIOS)
        scales = list(p.scale) or list(DEFAULT_SCALES)
        if self.stride <= 0 or p.base_size <= 0:
            raise self.error(f"feat_stride and base_size must be > 0, got {self.stride} and "
                             f"{p.base_size}")
        if min(ratios) <= 0 or min(scales) <= 0:
            raise self.error(f"ratio and scale values must be > 0, got ratio {ratios} "
                             f"scale {scales}")
        if not 0 <= self.nms_thresh <= 1:
            raise self.error(f"nms_thresh must be in [0, 1], got {self.nms_thresh}")
        self.anchors = base_anchors(int(p.base_size), ratios, scales)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        a = len(self.anchors)
        scores, deltas, info = (tuple(s) for s in bottom_shapes)
        if len(scores) != 4 or scores[1] != 2 * a:
            raise self.error(f"bottom 0 (scores) must be [N, 2·A = {2 * a}, H, W] for the "
                             f"{a} anchors, got {list(scores)}")
        if deltas != (scores[0], 4 * a) + scores[2:]:
            raise self.error(f"bottom 1 (deltas) must be [N, 4·A, H, W] = "
                             f"{[scores[0], 4 * a, *scores[2:]]}, got {list(deltas)}")
        if len(info) < 2 or info[0] != scores[0] or int(np.prod(info[1:])) != 3:
            raise self.error(f"bottom 2 (im_info) must be [N = {scores[0]}, 3] (height, width, "
                             f"scale), got {list(info)}")
        return [(1, 5), (1, 1)][:max(1, len(self.param.top))]

    def image_proposals(self, scores: np.ndarray, deltas: np.ndarray,
                        info: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image's proposals ``[R, 4]`` and scores ``[R]`` (float64), best first."""
        a = len(self.anchors)
        _, h, w = scores.shape
        shift_x, shift_y = np.meshgrid(np.arange(w) * self.stride, np.arange(h) * self.stride)
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
        anchors = (shifts + self.anchors[None]).reshape(-1, 4)      # (row, column, anchor)
        moves = deltas.astype(np.float64).reshape(a, 4, h * w).transpose(2, 0, 1).reshape(-1, 4)
        score = scores[a:].astype(np.float64).reshape(a, h * w).T.reshape(-1)
        boxes = apply_deltas(anchors, moves)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, info[1] - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, info[0] - 1)
        least = self.min_size * info[2]
        sides = boxes[:, 2:] - boxes[:, :2] + 1
        keep = np.flatnonzero((sides[:, 0] >= least) & (sides[:, 1] >= least))
        order = keep[np.argsort(-score[keep], kind="stable")]
        if self.pre_top > 0:
            order = order[:self.pre_top]
        kept = order[greedy_nms(boxes[order], self.nms_thresh, 1.0, overlaps_plus_one,
                                limit=max(self.post_top, 0))]
        return boxes[kept], score[kept]

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, deltas: torch.Tensor, info: torch.Tensor):
        s, d = (t.detach().to("cpu", torch.float32).numpy() for t in (scores, deltas))
        im_info = info.detach().to("cpu", torch.float64).numpy().reshape(len(s), 3)
        rois, kept_scores = [], []
        for i in range(len(s)):
            boxes, score = self.image_proposals(s[i], d[i], im_info[i])
            rois.append(np.concatenate([np.full((len(boxes), 1), i), boxes], axis=1))
            kept_scores.append(score[:, None])
        tops = [np.concatenate(rois).reshape(-1, 5), np.concatenate(kept_scores).reshape(-1, 1)]
        out = tuple(torch.from_numpy(t.astype(np.float32)).to(scores.device, scores.dtype)
                    for t in tops[:max(1, len(self.param.top))])
        return out if len(out) > 1 else out[0]
