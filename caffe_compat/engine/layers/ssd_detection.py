"""SSD's DetectionOutput (weiliu89/caffe branch ``ssd``, ``detection_output_layer.cpp`` and
``bbox_util.cpp``): decode location predictions against the priors, run per-class NMS, keep
the best ``keep_top_k`` per image.

Bottoms: loc ``[N, P·L·4]`` (L = 1 with ``share_location``, else ``num_classes``), conf
``[N, P·num_classes]`` (probabilities), priors ``[1, 2, P·4]`` (PriorBox's top). Top:
``[1, 1, D, 7]`` rows ``[image_id, label, score, xmin, ymin, xmax, ymax]``, images in order,
labels ascending within an image, scores descending within a label. With no detection at all
the top is one row per image ``[i, -1, -1, -1, -1, -1, -1]``, as SSD writes.

Per class (the background class skipped): scores above ``confidence_threshold`` (default:
all), stably sorted descending, cut to ``nms_param.top_k``, then greedy NMS: a box is kept
when its Jaccard overlap with every box kept so far is ``<= threshold``; with ``eta < 1`` the
threshold shrinks by ``eta`` after each kept box while it is above 0.5. Then, when more than
``keep_top_k`` boxes survive in an image, the best ``keep_top_k`` over all classes stay.
Overlaps, sizes and decoding are float32 like SSD's ``NormalizedBBox``. Decoded boxes are
not clipped (SSD's CPU forward passes ``clip_bbox = false``). There is no backward (SSD has
none). Writing result files (``save_output_param.output_directory``) is not supported.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.ssd import SSD
from caffe_compat.proto import caffe_pb2

log = logging.getLogger(__name__)
CORNER, CENTER_SIZE, CORNER_SIZE = (caffe_pb2.PriorBoxParameter.CORNER,
                                    caffe_pb2.PriorBoxParameter.CENTER_SIZE,
                                    caffe_pb2.PriorBoxParameter.CORNER_SIZE)
F32 = np.float32


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int,
                 variance_in_target: bool) -> np.ndarray:
    """SSD's DecodeBBox for ``[P, 4]`` float32 predictions; returns ``[P, 4]`` float32."""
    var = np.ones_like(variances) if variance_in_target else variances
    if code_type == CORNER:
        return (priors + var * loc).astype(F32)
    pw = (priors[:, 2] - priors[:, 0]).astype(F32)
    ph = (priors[:, 3] - priors[:, 1]).astype(F32)
    if code_type == CORNER_SIZE:
        scale = np.stack([pw, ph, pw, ph], axis=1)
        return (priors + var * loc * scale).astype(F32)
    if code_type != CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    pcx = ((priors[:, 0] + priors[:, 2]).astype(np.float64) / 2.0).astype(F32)
    pcy = ((priors[:, 1] + priors[:, 3]).astype(np.float64) / 2.0).astype(F32)
    cx = (var[:, 0] * loc[:, 0] * pw + pcx).astype(F32)
    cy = (var[:, 1] * loc[:, 1] * ph + pcy).astype(F32)
    w = (np.exp((var[:, 2] * loc[:, 2]).astype(F32)) * pw).astype(F32)
    h = (np.exp((var[:, 3] * loc[:, 3]).astype(F32)) * ph).astype(F32)
    w64, h64 = w.astype(np.float64) / 2.0, h.astype(np.float64) / 2.0
    return np.stack([cx - w64, cy - h64, cx + w64, cy + h64], axis=1).astype(F32)


def box_sizes(boxes: np.ndarray) -> np.ndarray:
    """SSD's BBoxSize (normalised): width·height in float32, 0 for inverted boxes."""
    w = (boxes[:, 2] - boxes[:, 0]).astype(F32)
    h = (boxes[:, 3] - boxes[:, 1]).astype(F32)
    return np.where((w < 0) | (h < 0), F32(0), (w * h).astype(F32)).astype(F32)


def jaccard(box: np.ndarray, size: F32, others: np.ndarray, other_sizes: np.ndarray) -> np.ndarray:
    """SSD's JaccardOverlap of one box with each of ``others`` (float32)."""
    apart = ((others[:, 0] > box[2]) | (others[:, 2] < box[0]) |
             (others[:, 1] > box[3]) | (others[:, 3] < box[1]))
    iw = (np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])).astype(F32)
    ih = (np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])).astype(F32)
    inter = (iw * ih).astype(F32)
    union = ((size + other_sizes).astype(F32) - inter).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = (inter / union).astype(F32)
    return np.where(apart | (iw <= 0) | (ih <= 0), F32(0), overlap)


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float,
        eta: float, top_k: int) -> list[int]:
    """SSD's ApplyNMSFast: indices kept, best first."""
    candidates = np.flatnonzero(scores > F32(score_threshold))
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    sizes = box_sizes(boxes)
    kept: list[int] = []
    threshold = F32(nms_threshold)
    for idx in order:
        if kept:
            overlaps = jaccard(boxes[idx], sizes[idx], boxes[kept], sizes[kept])
            if np.any(overlaps > threshold):
                continue
        kept.append(int(idx))
        if eta < 1 and threshold > 0.5:
            threshold = F32(threshold * F32(eta))
    return kept


@register
class DetectionOutput(Layer):
    """SSD's detection head: decoded, NMS-filtered boxes as ``[1, 1, D, 7]`` rows."""

    type = "DetectionOutput"
    exports_to_onnx = False
    traceable = False
    family = "ssd"
    origin = SSD
    num_bottoms = (3, 3)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param needs num_classes")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        self.code_type = int(p.code_type)
        self.variance_in_target = p.variance_encoded_in_target
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (float(p.confidence_threshold)
                                     if p.HasField("confidence_threshold")
                                     else -float(np.finfo(F32).max))
        self.nms_threshold = float(p.nms_param.nms_threshold)
        self.eta = float(p.nms_param.eta)
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        if self.nms_threshold < 0:
            raise self.error("nms_threshold must be non-negative")
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta:g}")
        if p.save_output_param.output_directory or p.visualize or p.save_file:
            log.warning("layer '%s' (DetectionOutput): writing result files, save_file and "
                        "visualize are not supported; the detections are only the top blob",
                        self.name)
        self.top_shapes(bottom_shapes)

    def _num_priors(self, prior_shape: Shape) -> int:
        height = (tuple(prior_shape) + (1, 1, 1))[2]
        return height // 4

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        loc, conf, prior = bottom_shapes
        p = self._num_priors(prior)
        loc_c = int(np.prod(loc[1:])) if len(loc) > 1 else 1
        conf_c = int(np.prod(conf[1:])) if len(conf) > 1 else 1
        if p * self.num_loc_classes * 4 != loc_c:
            raise self.error(f"{p} priors need {p * self.num_loc_classes * 4} location values "
                             f"per image, bottom 0 has {loc_c}")
        if p * self.num_classes != conf_c:
            raise self.error(f"{p} priors need {p * self.num_classes} confidences per image, "
                             f"bottom 1 has {conf_c}")
        if loc[0] != conf[0]:
            raise self.error(f"location ({loc[0]}) and confidence ({conf[0]}) batch sizes differ")
        return [(1, 1, 1, 7)]

    def _image_detections(self, loc: np.ndarray, conf: np.ndarray, priors: np.ndarray,
                          variances: np.ndarray) -> tuple[dict, dict]:
        """Kept prior indices per label for one image (after keep_top_k), and the decoded boxes."""
        decoded = {}
        for c in range(self.num_loc_classes):
            label = -1 if self.share_location else c
            if label == self.background:
                continue
            decoded[label] = decode_boxes(loc[:, c], priors, variances, self.code_type,
                                          self.variance_in_target)
        kept: dict[int, list[int]] = {}
        for c in range(self.num_classes):
            if c == self.background:
                continue
            boxes = decoded[-1 if self.share_location else c]
            kept[c] = nms(boxes, conf[:, c], self.confidence_threshold, self.nms_threshold,
                          self.eta, self.top_k)
        total = sum(len(v) for v in kept.values())
        if self.keep_top_k > -1 and total > self.keep_top_k:
            pairs = [(conf[i, c], c, i) for c, idx in kept.items() for i in idx]
            order = sorted(range(len(pairs)), key=lambda k: -pairs[k][0])[:self.keep_top_k]
            best: dict[int, list[int]] = {}
            for k in order:
                best.setdefault(pairs[k][1], []).append(pairs[k][2])
            kept = best
        return {c: kept[c] for c in sorted(kept)}, decoded

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        n = loc.shape[0]
        p = self._num_priors(tuple(prior.shape))
        loc_np = loc.detach().to("cpu", torch.float32).numpy().reshape(n, p, self.num_loc_classes, 4)
        conf_np = conf.detach().to("cpu", torch.float32).numpy().reshape(n, p, self.num_classes)
        prior_np = prior.detach().to("cpu", torch.float32).numpy().reshape(-1)
        priors, variances = prior_np[:p * 4].reshape(p, 4), prior_np[p * 4:p * 8].reshape(p, 4)
        rows = []
        for i in range(n):
            kept, decoded = self._image_detections(loc_np[i], conf_np[i], priors, variances)
            for c, indices in kept.items():
                boxes = decoded[-1 if self.share_location else c]
                for idx in indices:
                    rows.append([i, c, conf_np[i, idx, c], *boxes[idx]])
        if not rows:
            rows = [[i] + [-1] * 6 for i in range(n)]
        out = torch.tensor(np.asarray(rows, dtype=np.float32)).view(1, 1, len(rows), 7)
        return out.to(device=loc.device, dtype=loc.dtype)
