"""``caffe.layers.detectnet.mean_ap``: DetectNet's validation scores from rectangle lists.

``ScoreDetections`` (bottoms: ground-truth list, detection list, each ``N x rows x 5`` as
``clustering`` writes them; ``param_str``: the IoU threshold, 0.7 when empty) marks every
rectangle of each image: ``[x1, y1, x2, y2, mark]`` with mark 1 for a detection matched to a
ground truth (true positive), 2 for an unmatched detection (false positive) and 3 for a
ground truth no detection matched (DIGITS calls it a "true negative"; it is a miss). Each
ground truth, in list order, takes the first still-unmatched detection whose IoU with it
reaches the threshold. Rows are the true positives, then the false positives, then the
misses, zero-padded.

``mAP`` (bottom: those marks; tops: mAP, precision, recall, each of shape ``(1,)``) counts
the marks of the whole batch: precision = TP / (TP + FP) and recall = TP / (TP + misses), in
percent (0 when a count is empty), and DIGITS' "mAP" = precision x recall / 100. Its
``param_str`` (DIGITS writes the image size there) is not used.

Differences from NVIDIA/caffe's layers: ``ScoreDetections``' top has as many rows per image
as its two bottoms together (at least 50), so every mark fits (a fixed 50 rows failed with
a shape error once detections and misses passed 50); a ``param_str`` that is neither empty
nor a number is an error naming the layer (it was silently replaced by 0.7).
"""
from __future__ import annotations

import numpy as np

from caffe_compat.pycaffe import PythonLayer

from caffe_compat.detectnet.clustering import MAX_BOXES, layer_label

TRUE_POSITIVE, FALSE_POSITIVE, MISSED = 1, 2, 3


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` rectangles (continuous edges)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    overlap = width * height
    if overlap == 0:
        return 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return float(overlap / union)


def _listed(rows: np.ndarray) -> np.ndarray:
    """The rectangles of one image's list: the padding rows have four zero coordinates."""
    boxes = np.asarray(rows, dtype=np.float64)[:, :4]
    return boxes[np.any(boxes != 0, axis=1)]


def mark_image(truth: np.ndarray, detections: np.ndarray, threshold: float) -> np.ndarray:
    """The marked rows of one image (module docstring), TPs, FPs, then misses."""
    truth, detections = _listed(truth), _listed(detections)
    truth_hit = np.zeros(len(truth), dtype=bool)
    detection_hit = np.zeros(len(detections), dtype=bool)
    for i, box in enumerate(truth):
        for j, det in enumerate(detections):
            if not detection_hit[j] and iou(det, box) >= threshold:
                truth_hit[i] = detection_hit[j] = True
                break
    groups = ((detections[detection_hit], TRUE_POSITIVE),
              (detections[~detection_hit], FALSE_POSITIVE), (truth[~truth_hit], MISSED))
    return np.vstack([np.hstack([boxes, np.full((len(boxes), 1), mark)])
                      for boxes, mark in groups])


class ScoreDetections(PythonLayer):
    """Marks detections against ground truth (module docstring)."""

    def setup(self, bottom, top):
        text = (self.param_str or "").strip()
        try:
            self.iou_threshold = float(text) if text else 0.7
        except ValueError:
            raise ValueError(f"{layer_label(self)}: param_str '{self.param_str}' should be the IoU "
                             "threshold (a number) or empty for 0.7") from None
        if len(bottom) != 2 or len(top) != 1:
            raise ValueError(f"{layer_label(self)}: needs bottoms (ground truth, detections) and "
                             f"one top, got {len(bottom)} and {len(top)}")

    def reshape(self, bottom, top):
        truth, detections = bottom[0].data, bottom[1].data
        if truth.ndim != 3 or detections.ndim != 3 or truth.shape[0] != detections.shape[0] \
                or min(truth.shape[2], detections.shape[2]) < 4:
            raise ValueError(f"{layer_label(self)}: bottoms {list(truth.shape)} and "
                             f"{list(detections.shape)} should both be N x rows x 5")
        rows = max(MAX_BOXES, truth.shape[1] + detections.shape[1])
        top[0].reshape(truth.shape[0], rows, 5)

    def forward(self, bottom, top):
        out = np.zeros(top[0].data.shape)
        for image, (truth, detections) in enumerate(zip(bottom[0].data, bottom[1].data)):
            marked = mark_image(truth, detections, self.iou_threshold)
            out[image, :len(marked)] = marked
        top[0].data[...] = out


def scores(marks: np.ndarray) -> tuple[float, float, float]:
    """(mAP, precision, recall) in percent from the mark column of a batch."""
    marks = np.asarray(marks)[..., 4]
    tp, fp, missed = ((marks == m).sum() for m in (TRUE_POSITIVE, FALSE_POSITIVE, MISSED))
    precision = 100.0 * tp / (tp + fp) if tp + fp else 0.0
    recall = 100.0 * tp / (tp + missed) if tp + missed else 0.0
    return precision * recall / 100.0, precision, recall


class mAP(PythonLayer):  # noqa: N801  (the class name DIGITS' prototxt names)
    """DIGITS' precision, recall and mAP of a batch (module docstring)."""

    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 3:
            raise ValueError(f"{layer_label(self)}: needs one bottom (marked rows) and three tops "
                             f"(mAP, precision, recall), got {len(bottom)} and {len(top)}")

    def reshape(self, bottom, top):
        for blob in top:
            blob.reshape(1)

    def forward(self, bottom, top):
        for blob, value in zip(top, scores(bottom[0].data)):
            blob.data[...] = value


__all__ = ["ScoreDetections", "mAP"]
