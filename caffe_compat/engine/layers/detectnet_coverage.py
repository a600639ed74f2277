"""DetectNet's ground-truth grid (NVIDIA/caffe ``util/detectnet_coverage_rectangular.cpp``):
the bounding boxes of one image turned into the label tensor DIGITS' train_val nets slice.

Channels, per grid cell (``stride`` × ``stride`` image pixels): 0 foreground, 1–4 the box's
corners relative to the cell's top-left (x1, y1, x2, y2), 5–6 ``1/width``, ``1/height``,
7 the object norm, then one coverage channel per destination class of ``object_class``.
Rectangles are ``(x, y, w, h)`` tuples intersected like OpenCV's ``Rect_::operator&``.
Everything is float64 here; the fork computes in float32.
"""
from __future__ import annotations

import math

import numpy as np

FLT_EPSILON = float(np.finfo(np.float32).eps)
LABEL_FIELDS = 16          # floats per box row: bbox 4, alpha, class, scenario, roty,
#                            truncated, occlusion, dimensions 3, location 3
TRANSFORMED_CHANNELS = 8   # the channels before the per-class coverage channels


def intersect(a: tuple, b: tuple) -> tuple:
    """OpenCV's ``a & b``: the overlap, or the zero rectangle when it is empty."""
    x, y = max(a[0], b[0]), max(a[1], b[1])
    w = min(a[0] + a[2], b[0] + b[2]) - x
    h = min(a[1] + a[3], b[1] + b[3]) - y
    return (0, 0, 0, 0) if w <= 0 or h <= 0 else (x, y, w, h)


class CoverageGrid:
    """The fork's RectangularCoverageGenerator for one ``detectnet_groundtruth_param``
    (its only coverage type; the proto's enum has no other)."""

    def __init__(self, p):
        self.stride = int(p.stride)
        self.image = (float(p.image_size_x), float(p.image_size_y))
        # Rect(Point2f, Size2f) to Rect rounds with cvRound (half to even), as np.rint
        self.grid_w = int(np.rint(p.image_size_x / self.stride))
        self.grid_h = int(np.rint(p.image_size_y / self.stride))
        self.scale_cvg = float(np.float32(p.scale_cvg))
        self.grid_min = p.gridbox_type == p.GRIDBOX_MIN
        self.min_len, self.max_len = float(p.min_cvg_len), float(p.max_cvg_len)
        self.min_obj_norm = 0.0 if p.obj_norm else 1.0
        self.crop_bboxes = bool(p.crop_bboxes)
        # no object_class: class 1 -> coverage 0 (KITTI's car, the fork's fallback)
        self.classes = {m.src: m.dst for m in p.object_class} or {1: 0}
        self.channels = max(self.classes.values()) + 1 + TRANSFORMED_CHANNELS

    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.grid_h, self.grid_w)

    def kept_boxes(self, rows: np.ndarray) -> list[tuple[tuple, int]]:
        """(bbox, coverage channel) of the rows the fork keeps: cropped to the image when
        ``crop_bboxes``, of a mapped class, with an area of at least FLT_EPSILON."""
        kept = []
        for row in rows:
            box = tuple(float(v) for v in row[:4])
            if self.crop_bboxes:
                box = intersect(box, (0.0, 0.0) + self.image)
            cls = math.trunc(float(row[5]))            # size_t(classNumber)
            if cls not in self.classes or box[2] * box[3] < FLT_EPSILON:
                continue
            kept.append((box, self.classes[cls]))
        return kept

    def coverage_box(self, box: tuple) -> tuple:
        """The box shrunk by ``scale_cvg`` about its centre, its sides bounded by
        ``min_cvg_len`` (GRIDBOX_MIN, never past the box) or ``max_cvg_len`` (GRIDBOX_MAX)."""
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        w, h = box[2] * self.scale_cvg, box[3] * self.scale_cvg
        if self.grid_min:
            w, h = min(box[2], max(self.min_len, w)), min(box[3], max(self.min_len, h))
        else:
            w, h = min(self.max_len, w), min(self.max_len, h)
        w, h = abs(w), abs(h)                   # Rect(pt1, pt2) orders its corners
        return (cx - w / 2, cy - h / 2, w, h)

    def cells(self, cover: tuple) -> tuple[range, range]:
        """The grid cells the coverage box touches (floor/ceil), within the grid."""
        s = self.stride
        x0, y0 = math.floor(cover[0] / s), math.floor(cover[1] / s)
        x1, y1 = math.ceil((cover[0] + cover[2]) / s), math.ceil((cover[1] + cover[3]) / s)
        g = intersect((min(x0, x1), min(y0, y1), abs(x1 - x0), abs(y1 - y0)),
                      (0, 0, self.grid_w, self.grid_h))
        return range(g[1], g[1] + g[3]), range(g[0], g[0] + g[2])

    def generate(self, rows: np.ndarray) -> np.ndarray:
        """The ``[channels, grid_h, grid_w]`` label of one image's box rows; a later box
        overwrites an earlier one in the cells both cover."""
        out = np.zeros(self.shape())
        s = float(self.stride)
        for box, channel in self.kept_boxes(rows):
            cover = self.coverage_box(box)
            area = cover[2] * cover[3]
            obj_norm = s * s / area if area else math.inf
            ys, xs = self.cells(cover)
            for gy in ys:
                for gx in xs:
                    cell = (gx * s, gy * s, s, s)
                    shared = intersect(cover, cell)
                    if shared[2] * shared[3] / (s * s) <= FLT_EPSILON:
                        continue
                    out[TRANSFORMED_CHANNELS:, gy, gx] = 0
                    out[TRANSFORMED_CHANNELS + channel, gy, gx] = 1
                    out[:TRANSFORMED_CHANNELS, gy, gx] = (
                        1, box[0] - cell[0], box[1] - cell[1], box[0] + box[2] - cell[0],
                        box[1] + box[3] - cell[1], 1 / box[2], 1 / box[3],
                        max(self.min_obj_norm, obj_norm))
        return out


def label_rows(layer, label: np.ndarray) -> np.ndarray:
    """One image's box rows from its label values (the fork's layout: a header row whose
    first two values are the box count and the row length 16, then one row per box)."""
    count, length = int(label[0]), int(label[1])
    if length != LABEL_FIELDS:
        raise layer.error(f"the label header gives rows of {length} values; DetectNet's rows "
                          f"have {LABEL_FIELDS}")
    if count < 0 or LABEL_FIELDS * (count + 1) > label.size:
        raise layer.error(f"the label header lists {count} boxes; the label blob holds "
                          f"{label.size // LABEL_FIELDS - 1} rows per image")
    return label[LABEL_FIELDS:LABEL_FIELDS * (count + 1)].reshape(count, LABEL_FIELDS)
