"""SSD's DetectionEvaluate (weiliu89/caffe branch ``ssd``, ``detection_evaluate_layer.cpp``):
mark each detection of a test batch a true or a false positive, for the solver's mAP.

Bottoms: detections ``[1, 1, D, 7]`` rows ``[item_id, label, score, xmin, ymin, xmax, ymax]``
(DetectionOutput's top) and ground truth ``[1, 1, G, 8]`` rows ``[item_id, label, instance_id,
xmin, ymin, xmax, ymax, difficult]`` (AnnotatedData's label). Top ``[1, 1, R, 5]``:

* one row ``[-1, c, num_pos, -1, -1]`` per class ``c`` but the background, ``num_pos`` the
  boxes of class ``c`` in the batch (without the difficult ones unless
  ``evaluate_difficult_gt``);
* one row ``[item_id, label, score, tp, fp]`` per detection, images ascending, labels
  ascending within an image. Where the image has boxes of that label the detections are in
  descending score (libstdc++'s ``std::sort`` order among ties, as the fork sorts) and each
  is matched to the box it overlaps most (the first such box on ties): a true positive when
  the overlap reaches ``overlap_threshold`` and that box is not yet taken, otherwise a false
  positive. When the best box is difficult and difficult boxes are not evaluated the row is
  ``tp = fp = 0``, which the solver skips. Rows of label -1 (DetectionOutput's "nothing
  found") are left out; R counts the detection rows of a label other than -1, and rows
  that are not written stay zero (the solver skips them too).

With ``name_size_file`` (lines ``name height width``, in the database's order) both boxes are
taken to that image's pixels first (clipped, scaled, through ``resize_param`` as the fork's
OutputBBox does) and overlaps use pixel sizes (``+1`` per side). The fork advances to the next
size once per image that has a detection row, across forwards, wrapping at the end of the file;
so does this layer. Arithmetic is float32 like the fork's ``NormalizedBBox``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.ssd import SSD
from caffe_compat.engine.layers.ssd_detection import box_sizes
from caffe_compat.engine.layers.stl_sort import sort_descending
from caffe_compat.proto import caffe_pb2

F32 = np.float32
_RESIZE = caffe_pb2.ResizeParameter
Groups = dict[int, dict[int, list[int]]]   # item_id -> label -> row indices, in row order


def read_name_sizes(path: str) -> list[tuple[int, int]]:
    """``(height, width)`` of each ``name height width`` line; reading stops, as the fork's
    stream does, at the first entry whose sizes are not integers."""
    try:
        with open(path, encoding="utf-8") as f:
            words = f.read().split()
    except OSError as exc:
        raise FileNotFoundError(f"Failed to open name size file: {path} ({exc})") from None
    sizes = []
    for k in range(0, len(words) - 2, 3):
        try:
            sizes.append((int(words[k + 1]), int(words[k + 2])))
        except ValueError:
            break
    return sizes


def _clip(boxes: np.ndarray, height: float = 1.0, width: float = 1.0):
    """The fork's ClipBBox: corners into ``[0, width] × [0, height]``; sizes normalised."""
    limit = np.array([width, height, width, height], dtype=F32)
    out = np.minimum(np.maximum(boxes, F32(0)), limit).astype(F32)
    return out, box_sizes(out)


def _scale(boxes: np.ndarray, height: int, width: int):
    """The fork's ScaleBBox: corners times the image size; pixel sizes when it exceeds 1."""
    out = (boxes * np.array([width, height, width, height], dtype=F32)).astype(F32)
    return out, box_sizes(out, normalized=not (width > 1 or height > 1))


def _unpad(boxes: np.ndarray, height: int, width: int, resize) -> np.ndarray:
    """FIT_LARGE_SIZE_AND_PAD: boxes relative to the padded input back to the image's part of
    it (the fork's ProjectBBox; a box outside that part stays as it was)."""
    rh, rw = F32(resize.height), F32(resize.width)
    aspect = F32(width) / F32(height)
    if aspect > rw / rh:
        pad = F32((rh - rw / aspect) / F32(2)) / rh
        src = np.array([0, pad, 1, 1 - np.float64(pad)], dtype=F32)
    else:
        pad = F32((rw - rh * aspect) / F32(2)) / rw
        src = np.array([pad, 0, 1 - np.float64(pad), 1], dtype=F32)
    sw, sh = F32(src[2] - src[0]), F32(src[3] - src[1])
    outside = ((boxes[:, 0] >= src[2]) | (boxes[:, 2] <= src[0])
               | (boxes[:, 1] >= src[3]) | (boxes[:, 3] <= src[1]))
    scale = np.array([sw, sh, sw, sh], dtype=F32)
    projected, _ = _clip(((boxes - src[[0, 1, 0, 1]]).astype(F32) / scale).astype(F32))
    return np.where(outside[:, None], boxes, projected).astype(F32)


def to_image(boxes: np.ndarray, height: int, width: int, resize=None):
    """The fork's OutputBBox: normalised ``[n, 4]`` boxes in the pixels of an image of this
    size, undoing ``resize`` (a ResizeParameter or None). Returns (boxes, sizes)."""
    mode = resize.resize_mode if resize is not None else 0
    if mode == _RESIZE.FIT_LARGE_SIZE_AND_PAD:
        if resize.height <= 0 or resize.width <= 0:
            raise ValueError("resize_param FIT_LARGE_SIZE_AND_PAD needs height and width > 0")
        boxes = _unpad(boxes, height, width, resize)
    elif mode == _RESIZE.FIT_SMALL_SIZE and resize.height_scale and resize.width_scale:
        scaled, _ = _scale(boxes, resize.height_scale, resize.width_scale)
        return _clip(scaled, float(height), float(width))
    return _scale(_clip(boxes)[0], height, width)


def overlaps(dets: np.ndarray, det_sizes: np.ndarray, gts: np.ndarray, gt_sizes: np.ndarray,
             normalized: bool) -> np.ndarray:
    """The fork's JaccardOverlap of every detection (rows) with every box (columns), float32.
    Disjoint boxes intersect in the empty box at the origin, which in pixels still measures
    1×1 (the fork's ``+1``): their overlap is tiny but not 0."""
    d, g = dets[:, None, :], gts[None, :, :]
    disjoint = ((g[..., 0] > d[..., 2]) | (g[..., 2] < d[..., 0])
                | (g[..., 1] > d[..., 3]) | (g[..., 3] < d[..., 1]))
    iw = (np.minimum(d[..., 2], g[..., 2]) - np.maximum(d[..., 0], g[..., 0])).astype(F32)
    ih = (np.minimum(d[..., 3], g[..., 3]) - np.maximum(d[..., 1], g[..., 1])).astype(F32)
    iw, ih = np.where(disjoint, F32(0), iw), np.where(disjoint, F32(0), ih)
    if not normalized:
        iw, ih = iw + F32(1), ih + F32(1)
    inter = (iw * ih).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        union = ((det_sizes[:, None] + gt_sizes[None, :]).astype(F32) - inter).astype(F32)
        result = (inter / union).astype(F32)
    return np.where((iw > 0) & (ih > 0), result, F32(0)).astype(F32)


def group_rows(rows: np.ndarray, background: int, what: str, stop_at_end: bool) -> Groups:
    """Row indices by item_id and label (both truncated to int, as the fork casts them); rows
    of item_id -1 are skipped, or end the list (``stop_at_end``: the ground truth's rule)."""
    groups: Groups = {}
    for k in range(len(rows)):
        item = int(rows[k, 0])
        if item == -1:
            if stop_at_end:
                break
            continue
        label = int(rows[k, 1])
        if label == background:
            raise ValueError(f"Found background label in the {what}.")
        groups.setdefault(item, {}).setdefault(label, []).append(k)
    return groups


def mark(order_overlaps: np.ndarray, difficult: np.ndarray, threshold: float,
         evaluate_difficult: bool) -> list[tuple[int, int]]:
    """(tp, fp) of detections, best score first, against their overlaps ``[D, G]`` with the
    image's boxes of their label: greedy, each box matched at most once."""
    taken = np.zeros(order_overlaps.shape[1], dtype=bool)
    marks = []
    for row in order_overlaps:
        best = int(np.argmax(row))          # first of equal maxima, as the fork's ">" scan
        if not row[best] >= F32(threshold):
            marks.append((0, 1))
        elif difficult[best] and not evaluate_difficult:
            marks.append((0, 0))
        elif taken[best]:
            marks.append((0, 1))
        else:
            taken[best] = True
            marks.append((1, 0))
    return marks


@register
class DetectionEvaluate(Layer):
    """SSD's per-batch detection scoring: ``[1, 1, R, 5]`` rows the solver turns into mAP."""

    type = "DetectionEvaluate"
    exports_to_onnx = False
    traceable = False
    family = "ssd"
    origin = SSD
    num_bottoms = (2, 2)
    no_grad_bottoms = (0, 1)
    full_precision = True     # its rows are scores and counts: no reduced-precision copies

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error("detection_evaluate_param needs num_classes")
        self.num_classes = int(p.num_classes)
        self.background = int(p.background_label_id)
        self.threshold = float(p.overlap_threshold)
        if not self.threshold > 0:
            raise self.error(f"overlap_threshold must be positive, got {self.threshold:g}")
        self.evaluate_difficult = p.evaluate_difficult_gt
        self.sizes = read_name_sizes(p.name_size_file) if p.HasField("name_size_file") else []
        self.resize = p.resize_param if p.HasField("resize_param") else None
        self.count = 0   # the next entry of ``sizes`` (the fork's count_)
        self.classes = [c for c in range(self.num_classes) if c != self.background]
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        det, gt = (tuple(s) + (1,) * (4 - len(s)) for s in bottom_shapes)
        if det[:2] != (1, 1) or det[3] != 7:
            raise self.error(f"bottom 0 must be 1×1×D×7 detections, got {list(det)}")
        if gt[:2] != (1, 1) or gt[3] != 8:
            raise self.error(f"bottom 1 must be 1×1×G×8 ground truth rows, got {list(gt)}")
        return [(1, 1, len(self.classes) + det[2], 5)]

    def _num_pos(self, gt: np.ndarray, groups: Groups) -> list[list[float]]:
        counts: dict[int, int] = {}
        for labels in groups.values():
            for label, rows in labels.items():
                hard = 0 if self.evaluate_difficult else int(np.count_nonzero(gt[rows, 7]))
                counts[label] = counts.get(label, 0) + len(rows) - hard
        return [[-1, c, counts.get(c, 0), -1, -1] for c in self.classes]

    def _label_rows(self, item: int, label: int, det: np.ndarray, rows: list[int],
                    gt: np.ndarray, gt_rows: list[int] | None) -> list[list[float]]:
        scores = det[rows, 2]
        if gt_rows is None:                  # no box of this label here: all false positives
            return [[item, label, s, 0, 1] for s in scores]
        order = np.asarray(rows)[sort_descending(scores)]
        boxes, gts = det[order, 3:7], gt[gt_rows, 3:7]
        normalized = not self.sizes
        if normalized:
            det_sizes, gt_sizes = box_sizes(boxes), box_sizes(gts)
        else:
            height, width = self.sizes[self.count]
            boxes, det_sizes = to_image(boxes, height, width, self.resize)
            gts, gt_sizes = to_image(gts, height, width, self.resize)
        table = overlaps(boxes, det_sizes, gts, gt_sizes, normalized)
        marks = mark(table, gt[gt_rows, 7] != 0, self.threshold, self.evaluate_difficult)
        return [[item, label, det[k, 2], tp, fp] for k, (tp, fp) in zip(order, marks)]

    def _image_rows(self, item: int, labels: dict[int, list[int]], det: np.ndarray,
                    gt: np.ndarray, gt_groups: Groups) -> list[list[float]]:
        out = []
        truth = gt_groups.get(item, {})
        for label in sorted(labels):
            if label != -1:
                out += self._label_rows(item, label, det, labels[label], gt, truth.get(label))
        return out

    def forward(self, det_t: torch.Tensor, gt_t: torch.Tensor) -> torch.Tensor:
        det = det_t.detach().to("cpu", torch.float32).numpy().reshape(-1, 7)
        gt = gt_t.detach().to("cpu", torch.float32).numpy().reshape(-1, 8)
        try:
            det_groups = group_rows(det, self.background, "detection results", False)
            gt_groups = group_rows(gt, self.background, "dataset", True)
            rows = self._num_pos(gt, gt_groups)
            for item in sorted(det_groups):
                rows += self._image_rows(item, det_groups[item], det, gt, gt_groups)
                if self.sizes:
                    self.count = (self.count + 1) % len(self.sizes)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        height = len(self.classes) + int(np.count_nonzero(det[:, 1] != -1))
        out = np.zeros((max(height, len(rows)), 5), dtype=F32)
        if rows:
            out[:len(rows)] = np.asarray(rows, dtype=np.float64)
        return torch.from_numpy(out).view(1, 1, len(out), 5).to(device=det_t.device,
                                                                 dtype=det_t.dtype)
