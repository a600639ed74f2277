"""SSD's training-side box logic (weiliu89/caffe ``bbox_util.cpp``), used by MultiBoxLoss:
reading the ground-truth rows, matching priors (or decoded predictions) to ground truth,
encoding the matched boxes as regression targets, and choosing the hard negatives.

All box arithmetic is float32, as SSD's ``NormalizedBBox`` is; overlaps come from
``ssd_detection.jaccard_matrix``, the same function DetectionOutput's NMS uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caffe_compat.engine.layers.ssd_detection import (CENTER_SIZE, CORNER, CORNER_SIZE, F32,
                                                      box_sizes, jaccard_matrix)
from caffe_compat.engine.layers.stl_sort import sort_descending
from caffe_compat.proto import caffe_pb2

_P = caffe_pb2.MultiBoxLossParameter
BIPARTITE, PER_PREDICTION = _P.BIPARTITE, _P.PER_PREDICTION
MIN_OVERLAP = 1e-6  # SSD keeps only overlaps above this (compared as a double)


class MatchingError(ValueError):
    """Data SSD would abort on (a background-labelled box, a degenerate prior)."""


@dataclass
class GroundTruth:
    """One image's kept ground-truth boxes, in label-row order."""
    boxes: np.ndarray   # [G, 4] float32 xmin, ymin, xmax, ymax
    labels: np.ndarray  # [G] int64


def read_ground_truth(rows: np.ndarray, background: int,
                      use_difficult: bool) -> dict[int, GroundTruth]:
    """Rows ``[item_id, label, instance_id, xmin, ymin, xmax, ymax, difficult]`` grouped by
    image. ``item_id == -1`` rows are padding; difficult rows are dropped unless
    ``use_difficult``; an image left without boxes gets no entry (SSD then mines no
    negatives in it). A background label is an error, even on a dropped row, as in SSD."""
    rows = rows.reshape(-1, 8)
    items = np.trunc(rows[:, 0]).astype(np.int64)     # static_cast<int>
    labels = np.trunc(rows[:, 1]).astype(np.int64)
    real = items != -1
    if np.any(real & (labels == background)):
        raise MatchingError(f"a ground-truth box has the background label {background}")
    keep = real & (use_difficult | (rows[:, 7] == 0))
    out: dict[int, GroundTruth] = {}
    for item in dict.fromkeys(items[keep].tolist()):   # first-seen order, rows in order
        mine = keep & (items == item)
        out[item] = GroundTruth(rows[mine, 3:7].astype(F32), labels[mine])
    return out


def cross_boundary(boxes: np.ndarray) -> np.ndarray:
    """SSD's IsCrossBoundaryBBox per box: a corner outside [0, 1]."""
    return np.any((boxes < 0) | (boxes > 1), axis=1)


def match_boxes(candidates: np.ndarray, gt: np.ndarray, match_type: int, threshold: float,
                ignore_cross_boundary: bool) -> tuple[np.ndarray, np.ndarray]:
    """SSD's MatchBBox: for each of ``candidates`` ``[P, 4]`` the index of its ground truth
    in ``gt`` ``[G, 4]`` (-1 none, -2 ignored across the image boundary) and its overlap.

    Bipartite first: the best remaining (candidate, gt) pair is matched, both leave the
    pool, until no overlapping pair is left (ties: lowest candidate, then lowest gt, as
    SSD's scan finds them). PER_PREDICTION then gives each unmatched candidate its best gt
    among those overlapping it by at least ``threshold``. The overlap of an unmatched
    candidate is its largest one (0 when none exceeds 1e-6), which mining compares with
    ``neg_overlap``."""
    count = len(candidates)
    match = np.full(count, -1, dtype=np.int64)
    best = np.zeros(count, dtype=F32)
    if len(gt) == 0:
        return match, best
    skip = cross_boundary(candidates) if ignore_cross_boundary else np.zeros(count, bool)
    match[skip] = -2
    overlaps = jaccard_matrix(candidates, gt)                            # [P, G]
    present = (overlaps.astype(np.float64) > MIN_OVERLAP) & ~skip[:, None]
    best = np.where(present, overlaps, F32(0)).max(axis=1).astype(F32)
    _bipartite(np.where(present, overlaps, -np.inf), overlaps, match, best)
    if match_type == PER_PREDICTION:
        _per_prediction(present & (overlaps >= F32(threshold)), overlaps, match, best)
    elif match_type != BIPARTITE:
        raise MatchingError(f"unknown match_type {match_type}")
    return match, best


def _bipartite(work: np.ndarray, overlaps: np.ndarray, match: np.ndarray,
               best: np.ndarray) -> None:
    """Greedy global matching on ``work`` (absent pairs -inf), in place."""
    gts = work.shape[1]
    for _ in range(gts):
        flat = int(np.argmax(work))          # first maximum in row-major order
        i, j = divmod(flat, gts)
        if work[i, j] == -np.inf:
            return
        match[i], best[i] = j, overlaps[i, j]
        work[i, :] = -np.inf
        work[:, j] = -np.inf


def _per_prediction(allowed: np.ndarray, overlaps: np.ndarray, match: np.ndarray,
                    best: np.ndarray) -> None:
    """Each still-unmatched candidate takes its best allowed gt (first on ties), in place."""
    scores = np.where(allowed, overlaps, -np.inf)
    choice = scores.argmax(axis=1)
    rows = np.flatnonzero((match == -1) & allowed.any(axis=1))
    match[rows] = choice[rows]
    best[rows] = overlaps[rows, choice[rows]]


def encode_boxes(gt: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int,
                 variance_in_target: bool) -> np.ndarray:
    """SSD's EncodeBBox for matched pairs, float32 ``[K, 4]``. With ``variance_in_target``
    the variances are left out here (MultiBoxLoss divides targets and predictions by them
    afterwards); otherwise each coordinate is divided by its variance."""
    var = np.ones_like(variances) if variance_in_target else variances
    if not variance_in_target and code_type in (CORNER, CORNER_SIZE) and np.any(variances <= 0):
        raise MatchingError("prior variances must be positive")
    if code_type == CORNER:
        return ((gt - priors) / var).astype(F32)
    pw, ph = _sides(priors, "prior")
    if code_type == CORNER_SIZE:
        scale = np.stack([pw, ph, pw, ph], axis=-1)
        return ((gt - priors) / scale / var).astype(F32)
    if code_type != CENTER_SIZE:
        raise MatchingError(f"unknown code_type {code_type}")
    gw, gh = _sides(gt, "ground-truth box")
    pcx, pcy = _centres(priors)
    gcx, gcy = _centres(gt)
    with np.errstate(divide="ignore"):
        log_w = np.log((gw / pw).astype(np.float64)).astype(F32)
        log_h = np.log((gh / ph).astype(np.float64)).astype(F32)
    out = np.stack([(gcx - pcx) / pw, (gcy - pcy) / ph, log_w, log_h], axis=-1).astype(F32)
    return (out / var).astype(F32)


def _sides(boxes: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights (float32); SSD aborts on a non-positive one when encoding."""
    w = (boxes[:, 2] - boxes[:, 0]).astype(F32)
    h = (boxes[:, 3] - boxes[:, 1]).astype(F32)
    if not (np.all(w > 0) and np.all(h > 0)):
        raise MatchingError(f"a matched {what} has zero or negative width or height "
                            "(SSD's EncodeBBox requires positive sizes)")
    return w, h


def _centres(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ((boxes[:, 0] + boxes[:, 2]) / F32(2)).astype(F32), \
        ((boxes[:, 1] + boxes[:, 3]) / F32(2)).astype(F32)


def softmax_losses(conf: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-prior ``-log(max(p_label, FLT_MIN))`` of the softmax over the last axis, as the
    float32 values SSD ranks negatives by. ``conf`` ``[P, C]``, ``labels`` ``[P]``."""
    x = conf.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    picked = logp[np.arange(len(labels)), labels]
    return (-np.maximum(picked, np.log(np.finfo(F32).tiny))).astype(F32)


def logistic_losses(conf: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-prior sigmoid cross-entropy summed over classes, target one-hot at ``labels``
    (no 1 for a label outside [0, C)); float32 ``[P]``."""
    x = conf.astype(np.float64)
    target = (np.arange(x.shape[1])[None, :] == labels[:, None]).astype(np.float64)
    per = np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))
    return per.sum(axis=1).astype(F32)


def mining_candidates(match: np.ndarray, overlap: np.ndarray, hard_example: bool,
                      neg_overlap: float) -> np.ndarray:
    """Priors SSD may pick, ascending: every prior for HARD_EXAMPLE; for MAX_NEGATIVE the
    unmatched ones whose best overlap is below ``neg_overlap``."""
    if hard_example:
        return np.arange(len(match))
    return np.flatnonzero((match == -1) & (overlap < F32(neg_overlap)))


def negatives_wanted(match: np.ndarray, neg_pos_ratio: float) -> int:
    """MAX_NEGATIVE's cap: ``int(positives * neg_pos_ratio)`` in float, as SSD computes it."""
    return int(F32(np.count_nonzero(match > -1)) * F32(neg_pos_ratio))


def hardest(candidates: np.ndarray, losses: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` candidates of highest loss, ties ordered as libstdc++'s std::sort."""
    return candidates[sort_descending(losses[candidates])[:count]]


def hardest_after_nms(candidates: np.ndarray, losses: np.ndarray, count: int,
                      boxes: np.ndarray, threshold: float, top_k: int) -> np.ndarray:
    """SSD's ApplyNMS on the candidates' boxes by loss, then the first ``count`` kept.

    The candidates are stably sorted by loss and cut to ``top_k`` (an unset ``top_k`` is 0
    in SSD's proto: nothing is kept); the best box is kept, boxes smaller than 1e-5 are
    dropped and the rest lose every box overlapping the kept one by more than
    ``threshold``; the scan stops once ``top_k`` boxes are kept."""
    order = candidates[np.argsort(-losses[candidates], kind="stable")]
    if -1 < top_k < len(order):
        order = order[:top_k]
    sizes = box_sizes(boxes).astype(np.float64)
    kept: list[int] = []
    while len(order) and len(kept) < count:
        best, order = order[0], order[1:]
        if sizes[best] < 1e-5:
            continue
        kept.append(int(best))
        if -1 < top_k <= len(kept):
            break
        overlaps = jaccard_matrix(boxes[[best]], boxes[order])[0]
        order = order[(sizes[order] >= 1e-5) & ~(overlaps > F32(threshold))]
    return np.asarray(kept, dtype=np.int64)


def apply_mining(match: np.ndarray, chosen: np.ndarray,
                 hard_example: bool) -> tuple[np.ndarray, np.ndarray]:
    """(match, negatives) after mining: the chosen unmatched priors are the negatives
    (ascending; priors ignored across the boundary, -2, never are), and HARD_EXAMPLE
    unmatches the positives it did not choose."""
    picked = np.zeros(len(match), dtype=bool)
    picked[chosen] = True
    negatives = np.flatnonzero(picked & (match == -1))
    if hard_example:
        match = np.where((match > -1) & ~picked, -1, match)
    return match, negatives
