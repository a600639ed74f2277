"""Normalised boxes for SSD's AnnotatedData (weiliu89/caffe): the annotation rows an image
carries through its augmentations, the box arithmetic, and the random crops of
``batch_sampler``.

Coordinates are (xmin, ymin, xmax, ymax) in [0, 1] of the image, float32 as the fork stores
them, and every formula runs in float32 so the results round as the fork's do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caffe_compat.engine.layers.ssd_detection import box_sizes
from caffe_compat.formats.errors import DataError

f32 = np.float32
UNIT = np.array([0, 0, 1, 1], dtype=f32)


@dataclass(frozen=True)
class Boxes:
    """The objects of one image, group by group in record order (AnnotationGroup order,
    then Annotation order): dropping rows keeps that order, as the fork's groups do."""
    label: np.ndarray      # (n,) int: the group_label of each row
    instance: np.ndarray   # (n,) int: instance_id
    xyxy: np.ndarray       # (n, 4) float32
    difficult: np.ndarray  # (n,) bool

    @classmethod
    def from_record(cls, anno_datum) -> "Boxes":
        """The rows of an AnnotatedDatum message."""
        rows = [(g.group_label, a.instance_id, a.bbox) for g in anno_datum.annotation_group
                for a in g.annotation]
        xyxy = np.array([[b.xmin, b.ymin, b.xmax, b.ymax] for _, _, b in rows],
                        dtype=f32).reshape(-1, 4)
        return cls(np.array([r[0] for r in rows], dtype=np.int64),
                   np.array([r[1] for r in rows], dtype=np.int64), xyxy,
                   np.array([b.difficult for _, _, b in rows], dtype=bool))

    def __len__(self) -> int:
        return len(self.label)

    def keep(self, mask: np.ndarray, xyxy: np.ndarray) -> "Boxes":
        """The rows where ``mask`` holds, with new coordinates ``xyxy`` (one row per row)."""
        return Boxes(self.label[mask], self.instance[mask], xyxy[mask].astype(f32),
                     self.difficult[mask])


# ------------------------------------------------------------------- box arithmetic


def clip(b: np.ndarray) -> np.ndarray:
    return np.clip(b, f32(0), f32(1)).astype(f32)


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The intersection of boxes ``a`` and ``b`` (broadcast); all zeros where disjoint."""
    a, b = np.broadcast_arrays(a, b)
    disjoint = ((b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0])
                | (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1]))
    inter = np.concatenate([np.maximum(a[..., :2], b[..., :2]),
                            np.minimum(a[..., 2:], b[..., 2:])], axis=-1)
    return np.where(disjoint[..., None], f32(0), inter).astype(f32)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of ``a`` and ``b`` (broadcast)."""
    inter = intersect(a, b)
    iw, ih = inter[..., 2] - inter[..., 0], inter[..., 3] - inter[..., 1]
    size = iw * ih
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = size / (box_sizes(a) + box_sizes(b) - size)
    return np.where((iw > 0) & (ih > 0), iou, f32(0)).astype(f32)


def coverage(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The share of ``a``'s area that lies inside ``b``."""
    size = box_sizes(intersect(a, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = size / box_sizes(a)
    return np.where(size > 0, share, f32(0)).astype(f32)


def project(window: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``boxes`` in the coordinates of ``window``, clipped to it, and which of them keep a
    positive area there (a box only touching the window's edge is dropped)."""
    wx0, wy0, wx1, wy1 = window
    outside = ((boxes[:, 0] >= wx1) | (boxes[:, 2] <= wx0)
               | (boxes[:, 1] >= wy1) | (boxes[:, 3] <= wy0))
    scale = np.array([wx1 - wx0, wy1 - wy0] * 2, dtype=f32)
    moved = clip((boxes - np.array([wx0, wy0, wx0, wy0], dtype=f32)) / scale)
    return moved, ~outside & (box_sizes(moved) > 0)


def emitted(window: np.ndarray, boxes: np.ndarray, constraint) -> np.ndarray:
    """Which boxes an EmitConstraint lets through a crop to ``window``: CENTER keeps a box
    whose centre lies in the window (edges included); MIN_OVERLAP one whose share inside
    the window exceeds ``emit_overlap``."""
    if constraint.emit_type == constraint.CENTER:
        cx = (boxes[:, 0] + boxes[:, 2]) / f32(2)
        cy = (boxes[:, 1] + boxes[:, 3]) / f32(2)
        return (cx >= window[0]) & (cx <= window[2]) & (cy >= window[1]) & (cy <= window[3])
    return coverage(boxes, window) > f32(constraint.emit_overlap)


def crop_rect(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) in pixels of a normalised crop box, truncated as the fork's ScaleBBox and
    int casts do."""
    x0, y0, x1, y1 = clip(box) * np.array([width, height, width, height], dtype=f32)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


# --------------------------------------------------------------------- batch samplers


def check_sampler(bs, where: str) -> None:
    """DataError for a BatchSampler the fork would stop on (its CHECKs in SampleBBox)."""
    s = bs.sampler
    if not (0 < s.min_scale <= s.max_scale <= 1):
        raise DataError(f"{where}: batch_sampler.sampler needs 0 < min_scale <= max_scale "
                        f"<= 1 (got {s.min_scale:g}, {s.max_scale:g})")
    if not (0 < s.min_aspect_ratio <= s.max_aspect_ratio < np.finfo(f32).max):
        raise DataError(f"{where}: batch_sampler.sampler needs 0 < min_aspect_ratio <= "
                        f"max_aspect_ratio (got {s.min_aspect_ratio:g}, "
                        f"{s.max_aspect_ratio:g})")


def uniform(rng: np.random.Generator, low, high) -> np.float32:
    """A float32 draw from [low, high) (the fork's caffe_rng_uniform on floats)."""
    return f32(rng.uniform(float(low), float(high)))


def sample_box(sampler, rng: np.random.Generator) -> np.ndarray:
    """One random crop: area share in [min_scale, max_scale], aspect ratio in the sampler's
    range clamped so that neither side exceeds the image, placed uniformly inside it."""
    scale = uniform(rng, sampler.min_scale, sampler.max_scale)
    ratio = uniform(rng, sampler.min_aspect_ratio, sampler.max_aspect_ratio)
    square = float(scale) ** 2          # the fork's bounds are doubles cast to float
    ratio = min(max(ratio, f32(square)), f32(1 / square))
    w, h = f32(scale * np.sqrt(ratio)), f32(scale / np.sqrt(ratio))
    # A side may round one ulp past 1; the fork's uniform(0, 1 - w) would then abort.
    x, y = uniform(rng, 0, max(f32(1) - w, 0)), uniform(rng, 0, max(f32(1) - h, 0))
    return np.array([x, y, x + w, y + h], dtype=f32)


def satisfies(box: np.ndarray, objects: np.ndarray, c) -> bool:
    """SampleConstraint test of a crop against the objects (SatisfySampleConstraint).

    Without bounds every crop passes. Otherwise only the first kind of bound that is set
    (jaccard overlap, else sample coverage, else object coverage) decides: the fork marks
    the crop found as soon as one object passes that kind and returns it even when the
    object then fails a later kind, so the later kinds can never change the answer.
    """
    for name, value in (("jaccard_overlap", lambda: jaccard(box, objects)),
                        ("sample_coverage", lambda: coverage(box, objects)),
                        ("object_coverage", lambda: coverage(objects, box))):
        has_min, has_max = c.HasField(f"min_{name}"), c.HasField(f"max_{name}")
        if not (has_min or has_max):
            continue
        v = value()
        ok = np.ones(len(objects), dtype=bool)
        if has_min:
            ok &= ~(v < f32(getattr(c, f"min_{name}")))
        if has_max:
            ok &= ~(v > f32(getattr(c, f"max_{name}")))
        return bool(ok.any())
    return True


def generate_crops(objects: np.ndarray, samplers, rng: np.random.Generator) -> list[np.ndarray]:
    """Every sampler's accepted crops, in sampler order (GenerateBatchSamples): up to
    ``max_trials`` draws each, stopping at ``max_sample`` accepted ones when it is set."""
    crops: list[np.ndarray] = []
    for bs in samplers:
        if not bs.use_original_image:
            continue
        found = 0
        for _ in range(bs.max_trials):
            if bs.HasField("max_sample") and found >= bs.max_sample:
                break
            box = sample_box(bs.sampler, rng)
            if satisfies(box, objects, bs.sample_constraint):
                found += 1
                crops.append(box)
    return crops
