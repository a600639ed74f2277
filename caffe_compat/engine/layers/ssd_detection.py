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
``keep_top_k`` boxes survive in an image, the best ``keep_top_k`` over all classes stay,
chosen and ordered by SSD's ``std::sort`` (libstdc++'s order among equal scores).
Where SSD's CPU forward aborts and its GPU forward computes, this layer computes as the GPU
does (and OpenCV's DNN): ``background_label_id: -1`` with shared locations skips no class; a
prior of zero width or height (clipped beyond the image) decodes with the same formulas.
Overlaps, sizes and decoding are float32 like SSD's ``NormalizedBBox``. Decoded boxes are
not clipped (SSD's CPU forward passes ``clip_bbox = false``). There is no backward (SSD has
none). Writing result files (``save_output_param.output_directory``) is not supported.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.ssd import SSD
from caffe_compat.engine.layers.stl_sort import sort_descending
from caffe_compat.proto import caffe_pb2

log = logging.getLogger(__name__)
CORNER, CENTER_SIZE, CORNER_SIZE = (caffe_pb2.PriorBoxParameter.CORNER,
                                    caffe_pb2.PriorBoxParameter.CENTER_SIZE,
                                    caffe_pb2.PriorBoxParameter.CORNER_SIZE)
F32 = np.float32
MATRIX_LIMIT = 2048
NMS_BLOCK = 256           # boxes per block of the fixed-threshold pass
JACCARD_BAND = 24576      # overlaps at once: 96 KB temporaries, below glibc's mmap threshold


def float_exp(x: np.ndarray) -> np.ndarray:
    """C's ``expf``: the float32 nearest ``e**x``. NumPy's own float32 exp is up to an ulp off
    (on 4 values in 10), which moves SSD's box corners; its float64 exp, rounded, is not."""
    with np.errstate(over="ignore"):
        return np.exp(x.astype(np.float64)).astype(F32)


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int,
                 variance_in_target: bool) -> np.ndarray:
    """SSD's DecodeBBox, all boxes at once: float32 predictions ``[..., P, 4]`` against priors
    and variances ``[P, 4]``; returns float32 ``[..., P, 4]``."""
    var = np.ones_like(variances) if variance_in_target else variances
    if code_type == CORNER:
        return (priors + var * loc).astype(F32)
    pw = (priors[..., 2] - priors[..., 0]).astype(F32)
    ph = (priors[..., 3] - priors[..., 1]).astype(F32)
    if code_type == CORNER_SIZE:
        scale = np.stack([pw, ph, pw, ph], axis=-1)
        return (priors + var * loc * scale).astype(F32)
    if code_type != CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    pcx = ((priors[..., 0] + priors[..., 2]).astype(np.float64) / 2.0).astype(F32)
    pcy = ((priors[..., 1] + priors[..., 3]).astype(np.float64) / 2.0).astype(F32)
    cx = (var[..., 0] * loc[..., 0] * pw + pcx).astype(F32)
    cy = (var[..., 1] * loc[..., 1] * ph + pcy).astype(F32)
    w = (float_exp((var[..., 2] * loc[..., 2]).astype(F32)) * pw).astype(F32)
    h = (float_exp((var[..., 3] * loc[..., 3]).astype(F32)) * ph).astype(F32)
    w64, h64 = w.astype(np.float64) / 2.0, h.astype(np.float64) / 2.0
    return np.stack([cx - w64, cy - h64, cx + w64, cy + h64], axis=-1).astype(F32)


def box_sizes(boxes: np.ndarray, normalized: bool = True) -> np.ndarray:
    """SSD's BBoxSize of boxes ``[..., 4]``: width·height in float32 (pixel sizes count both
    ends: ``+1`` per side when not ``normalized``), 0 for inverted boxes."""
    with np.errstate(invalid="ignore", over="ignore"):
        w = (boxes[..., 2] - boxes[..., 0]).astype(F32)
        h = (boxes[..., 3] - boxes[..., 1]).astype(F32)
        inverted = (w < 0) | (h < 0)
        if not normalized:
            w, h = w + F32(1), h + F32(1)
        return np.where(inverted, F32(0), (w * h).astype(F32)).astype(F32)


def jaccard_matrix(kept: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """SSD's ``JaccardOverlap(candidate, kept)`` for every box of ``kept`` ``[A, 4]`` (rows)
    and of ``candidates`` ``[B, 4]`` (columns): ``[A, B]`` float32, elementwise SSD's float32
    operations. For boxes without NaN the function is symmetric. With NaN it is not:
    ``std::max``/``std::min`` return their first argument, the candidate's corner, when the
    comparison fails; that slower path runs only when a NaN is present. An overlap that
    comes out NaN (boxes infinite after an exp overflow) fails NMS's ``<=`` test.

    Computed in bands of rows: a 400×400 matrix's dozen float32 temporaries (640 KB each)
    were each a fresh mmap of glibc's, page faults included: 1.8 ms; in bands of
    ``JACCARD_BAND`` overlaps they come from the heap and stay in cache."""
    rows = max(1, JACCARD_BAND // max(1, len(candidates)))
    if len(kept) <= rows:
        return _jaccard_band(kept, candidates)
    out = np.empty((len(kept), len(candidates)), dtype=F32)
    for start in range(0, len(kept), rows):
        out[start:start + rows] = _jaccard_band(kept[start:start + rows], candidates)
    return out


def _jaccard_band(kept: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    sizes_k, sizes_c = box_sizes(kept), box_sizes(candidates)
    k0, k1, k2, k3 = (np.ascontiguousarray(kept[:, i])[:, None] for i in range(4))
    c0, c1, c2, c3 = (np.ascontiguousarray(candidates[:, i])[None, :] for i in range(4))
    if np.isnan(kept).any() or np.isnan(candidates).any():
        def larger(c, k):
            return np.where(c < k, k, c)

        def smaller(c, k):
            return np.where(k < c, k, c)
    else:
        larger, smaller = np.maximum, np.minimum
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        iw = smaller(c2, k2)
        iw -= larger(c0, k0)
        ih = smaller(c3, k3)
        ih -= larger(c1, k1)
        inter = iw * ih
        union = sizes_c[None, :] + sizes_k[:, None]
        union -= inter
        overlap = np.divide(inter, union, out=union)
    positive = iw > 0
    positive &= ih > 0
    overlap[~positive] = 0
    return overlap


def ranked_candidates(scores: np.ndarray, score_threshold: float, top_k: int) -> np.ndarray:
    """Indices of the scores above the threshold, stably sorted descending, the first
    ``top_k`` (all with -1). Only the ``top_k`` best are sorted: those strictly above the
    ``top_k``-th best score, then the ties at it in index order, exactly the head of a
    stable sort of them all."""
    candidates = np.flatnonzero(scores > F32(score_threshold))
    if -1 < top_k < len(candidates):
        values = scores[candidates]
        cut = np.partition(values, len(values) - top_k)[len(values) - top_k] if top_k else 0
        above = candidates[values > cut]
        ties = candidates[values == cut][:top_k - len(above)]
        candidates = np.concatenate([above, ties]) if top_k else candidates[:0]
    return candidates[np.argsort(-scores[candidates], kind="stable")]


def greedy_nms(boxes: np.ndarray, nms_threshold: float, eta: float,
               overlaps: Callable[[np.ndarray, np.ndarray], np.ndarray] = jaccard_matrix,
               strike_ties: bool = False, limit: int = 0) -> np.ndarray:
    """SSD's ApplyNMSFast after its sort: positions kept among ``[K, ...]`` boxes ranked best
    first. ``overlaps(kept, candidates)`` gives ``[A, B]`` overlaps (SSD's Jaccard by default);
    a candidate is struck out when its overlap with a kept box is above the threshold (SSD's
    ``<=`` keeps it, so NaN strikes it out) or, with ``strike_ties``, at or above it (YOLO's
    ``>=`` strikes it, so NaN keeps it).

    One overlap matrix, then a greedy pass that visits only the boxes it keeps: each kept
    box strikes out the later ones it overlaps by more than the threshold of the moment.
    That threshold never grows, so a struck box would also fail SSD's own test; with
    ``eta < 1`` the next survivor is still checked against every kept box at the current,
    smaller threshold, as SSD does. ``limit`` > 0 stops at that many kept boxes: the first
    ones kept never depend on the boxes after them (py-faster-rcnn's Proposal keeps its
    post_nms_topN: 6000 boxes, 300 kept took 207 ms of overlap rows for every box kept)."""
    if len(boxes) < 2:
        return np.arange(len(boxes))
    threshold = F32(nms_threshold)

    def survives(values: np.ndarray) -> np.ndarray:
        return ~(values >= threshold) if strike_ties else values <= threshold

    if not eta < 1 and (limit or len(boxes) <= MATRIX_LIMIT):
        # past MATRIX_LIMIT with nothing to stop early the blocks' overlaps with every box
        # kept before cost more than the rows below (6000 boxes, 2640 kept: 231 vs 155 ms)
        return _kept_in_blocks(boxes, overlaps, survives, limit)
    # Up to MATRIX_LIMIT candidates (16 MB of overlaps) all pairs at once; beyond (no top_k
    # and no confidence threshold, say) one row per kept box.
    matrix = overlaps(boxes, boxes) if len(boxes) <= MATRIX_LIMIT else None
    alive = np.ones(len(boxes), dtype=bool)  # not yet visited nor struck out
    kept: list[int] = []
    position = 0
    while alive[position]:
        alive[position] = False
        if not (eta < 1 and kept and not np.all(survives(
                matrix[kept, position] if matrix is not None
                else overlaps(boxes[kept], boxes[position:position + 1])))):
            kept.append(position)
            if 0 < limit <= len(kept):
                break
            # the boxes before ``position`` are decided: only later ones can be struck
            later = alive[position + 1:]
            later &= survives(matrix[position, position + 1:] if matrix is not None
                              else overlaps(boxes[position:position + 1],
                                            boxes[position + 1:])[0])
            if eta < 1 and threshold > 0.5:
                threshold = F32(threshold * F32(eta))
        position = int(alive.argmax())
    return np.asarray(kept, dtype=np.int64)


def _kept_in_blocks(boxes: np.ndarray, overlaps, survives, limit: int) -> np.ndarray:
    """The greedy pass at a fixed threshold, ``NMS_BLOCK`` boxes at a time: each block's
    boxes struck by a box kept in an earlier block go first, then the block's own pass. With
    ``limit`` the blocks after the one that fills it are never compared (py-faster-rcnn's
    Proposal: 6000 boxes, 300 kept, one overlap row per kept box took 25 ms, blocks of 256
    take 9)."""
    kept: list[int] = []
    for start in range(0, len(boxes), NMS_BLOCK):
        block = boxes[start:start + NMS_BLOCK]
        alive = np.ones(len(block), dtype=bool)
        if kept:
            alive &= survives(overlaps(boxes[kept], block)).all(axis=0)
        found = _kept_by_bits(_strikes_ahead(block, overlaps, survives), alive,
                              limit - len(kept) if limit else 0)
        kept.extend((found + start).tolist())
        if 0 < limit <= len(kept):
            break
    return np.asarray(kept, dtype=np.int64)


def _strikes_ahead(boxes: np.ndarray, overlaps, survives) -> np.ndarray:
    """``strikes[i, j]`` for ``j >= i`` (box ``i`` kept strikes box ``j`` out), False below
    the diagonal, which no pass reads: half the overlaps, in bands of rows that keep the
    temporaries small (SSD300's 20 classes × 400 boxes: 28 -> 22 ms)."""
    n = len(boxes)
    strikes = np.zeros((n, n), dtype=bool)
    rows = max(1, JACCARD_BAND // max(1, n))
    for start in range(0, n, rows):
        strikes[start:start + rows, start:] = ~survives(
            overlaps(boxes[start:start + rows], boxes[start:]))
    return strikes


def _kept_by_bits(strikes: np.ndarray, alive_at_start: np.ndarray, limit: int) -> np.ndarray:
    """The greedy pass at a fixed threshold over the boxes ``alive_at_start``,
    ``strikes[i, j]``: box ``i`` kept strikes box ``j`` out (``limit`` > 0: stop at that
    many kept). The boxes still alive are one Python integer's bits and each kept box's row
    another's, so a kept box costs two integer operations instead of numpy calls over every
    box (400 random boxes, 348 kept: the pass 4.1 -> 0.25 ms beside the overlaps' 1.8)."""
    rows = np.packbits(strikes, axis=1, bitorder="little")
    alive = int.from_bytes(np.packbits(alive_at_start, bitorder="little").tobytes(), "little")
    kept = []
    while alive and not 0 < limit <= len(kept):
        position = (alive & -alive).bit_length() - 1          # the best box still alive
        kept.append(position)
        alive &= ~int.from_bytes(rows[position].tobytes(), "little")
        alive &= ~(1 << position)
    return np.asarray(kept, dtype=np.int64)


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
        if not self.nms_threshold >= 0:  # SSD: CHECK_GE, which NaN fails
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
                          variances: np.ndarray) -> list[np.ndarray]:
        """One image's detections as ``[D, 6]`` float32 pieces ``[label, score, box]``, labels
        ascending, after per-class NMS and keep_top_k. ``loc``: ``[P, L, 4]``. Only each
        class's candidates (above the threshold, cut to top_k) are decoded: decoding is
        elementwise, so a subset decodes to the same boxes."""
        labels, indices, boxes = [], [], []
        for c in range(self.num_classes):
            if c == self.background:
                continue
            order = ranked_candidates(conf[:, c], self.confidence_threshold, self.top_k)
            decoded = decode_boxes(loc[order, 0 if self.share_location else c], priors[order],
                                   variances[order], self.code_type, self.variance_in_target)
            kept = greedy_nms(decoded, self.nms_threshold, self.eta)
            labels.append(np.full(len(kept), c, dtype=np.int64))
            indices.append(order[kept])
            boxes.append(decoded[kept])
        if not labels:
            return []
        labels, indices, boxes = (np.concatenate(labels), np.concatenate(indices),
                                  np.concatenate(boxes))
        scores = conf[indices, labels]
        if -1 < self.keep_top_k < len(indices):
            # SSD sorts the (score, label, index) pairs, built in label order, with std::sort
            # on the score (not stable: stl_sort puts ties where libstdc++ does), keeps the
            # best keep_top_k and regroups them by label, each in its sorted order: a stable
            # sort by label does that.
            best = sort_descending(scores)[:self.keep_top_k]
            best = best[np.argsort(labels[best], kind="stable")]
            labels, scores, boxes = labels[best], scores[best], boxes[best]
        rows = np.empty((len(labels), 6), dtype=F32)
        rows[:, 0], rows[:, 1], rows[:, 2:] = labels, scores, boxes
        return [rows]

    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        n = loc.shape[0]
        p = self._num_priors(tuple(prior.shape))
        loc_np = loc.detach().to("cpu", torch.float32).numpy().reshape(n, p, self.num_loc_classes, 4)
        conf_np = conf.detach().to("cpu", torch.float32).numpy().reshape(n, p, self.num_classes)
        prior_np = prior.detach().to("cpu", torch.float32).numpy().reshape(-1)
        priors, variances = prior_np[:p * 4].reshape(p, 4), prior_np[p * 4:p * 8].reshape(p, 4)
        pieces = []
        for i in range(n):
            for rows in self._image_detections(loc_np[i], conf_np[i], priors, variances):
                pieces.append(np.concatenate([np.full((len(rows), 1), i, dtype=F32), rows], 1))
        out = (np.concatenate(pieces) if pieces and sum(map(len, pieces))
               else np.array([[i] + [-1] * 6 for i in range(n)], dtype=F32))
        return torch.from_numpy(out).view(1, 1, len(out), 7).to(device=loc.device,
                                                                 dtype=loc.dtype)
