"""``caffe.layers.detectnet.clustering``: DetectNet's grid maps -> lists of rectangles.

A DetectNet net predicts, for every ``stride`` x ``stride`` cell of the input image, a
coverage value per class (how likely the cell lies on an object) and four bbox regressions
(the object's left, top, right, bottom edges in pixels, relative to the cell's top-left
corner). These layers read those maps back as image rectangles:

``ClusterDetections`` (bottoms: coverage ``N x C x H x W``, bboxes ``N x 4 x H x W``;
one top per class, ``N x max_boxes x 5``). ``param_str`` is
``"image_width, image_height, stride, coverage_threshold, group_threshold, eps, min_height
[, num_classes [, max_boxes]]"`` (defaults 1 and 50). Every cell whose coverage reaches the
threshold proposes one rectangle; ``cv2.groupRectangles`` merges proposals that agree within
``eps`` and keeps the clusters of more than ``group_threshold`` proposals, as their mean;
clusters shorter than ``min_height`` pixels are dropped. Each row is
``[x1, y1, x2, y2, log(cluster size)]``; unused rows are zero.

``ClusterGroundtruth`` (bottoms: coverage label, bbox label; ``param_str`` ``"image_width,
image_height, stride [, num_classes [, max_boxes]]"``) lists the distinct rectangles of the
cells with positive coverage, as ``[x1, y1, x2, y2, 0]`` rows, for ``mean_ap``.

Choices where NVIDIA/caffe's layer (Python 2) crashed or misread its input:
more detections than ``max_boxes`` keep the most confident ones (it raised a shape error);
more ground-truth boxes than ``max_boxes`` is an error naming the layer (dropping them would
bias the scores); the whole ``image_height/stride x image_width/stride`` grid is read (it
read only as many rows as the grid has columns, which loses the lower part of portrait
images); values are written in the blob's precision (it rounded them through float16);
ground-truth rows come sorted (it listed them in set order).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from caffe_compat.pycaffe import PythonLayer

MAX_BOXES = 50          # DetectNet's default number of rows per image and class


class _Field(NamedTuple):
    name: str
    kind: type
    default: object = None          # None: required


_GRID_FIELDS = (_Field("image_width", int), _Field("image_height", int), _Field("stride", int))
_TAIL_FIELDS = (_Field("num_classes", int, 1), _Field("max_boxes", int, MAX_BOXES))
DETECTION_FIELDS = _GRID_FIELDS + (
    _Field("coverage_threshold", float), _Field("group_threshold", int), _Field("eps", float),
    _Field("min_height", int)) + _TAIL_FIELDS
GROUNDTRUTH_FIELDS = _GRID_FIELDS + _TAIL_FIELDS


def _usage(fields) -> str:
    required = [f.name for f in fields if f.default is None]
    optional = [f.name for f in fields if f.default is not None]
    return ", ".join(required) + "".join(f"[, {name}" for name in optional) + "]" * len(optional)


def parse_param_str(text: str, fields, where: str) -> dict:
    """The comma-separated numbers of ``param_str`` by field name (DIGITS writes spaces
    after the commas, and optional fields may be left off)."""
    parts = [p.strip() for p in (text or "").split(",")] if (text or "").strip() else []
    required = sum(f.default is None for f in fields)
    if not required <= len(parts) <= len(fields):
        raise ValueError(f"{where}: param_str '{text}' needs {required} to {len(fields)} "
                         f"comma-separated numbers: {_usage(fields)}")
    values = {f.name: f.default for f in fields}
    for field, part in zip(fields, parts):
        try:
            values[field.name] = field.kind(part)
        except ValueError:
            kind = "an integer" if field.kind is int else "a number"
            raise ValueError(f"{where}: param_str field {field.name} is '{part}', not {kind} "
                             f"({_usage(fields)})") from None
    stride = values["stride"]
    if stride <= 0 or min(values["image_width"], values["image_height"]) < stride:
        raise ValueError(f"{where}: param_str needs stride > 0 and an image of at least one "
                         f"stride ({values['image_width']} x {values['image_height']}, stride "
                         f"{values['stride']})")
    if values["num_classes"] < 1 or values["max_boxes"] < 1:
        raise ValueError(f"{where}: param_str needs num_classes and max_boxes of at least 1")
    return values


def grid_proposals(coverage: np.ndarray, bboxes: np.ndarray, params: dict, keep) -> np.ndarray:
    """One ``[x1, y1, x2, y2]`` row (float64) per grid cell whose coverage ``keep`` accepts,
    in row-major cell order (groupRectangles' result order follows its input order)."""
    grid_w = params["image_width"] // params["stride"]
    grid_h = params["image_height"] // params["stride"]
    # Integer cell sizes: DetectNet ran under Python 2, where image_size / grid_size with
    # ints floors; they equal the stride whenever the image is a multiple of it.
    cell_w, cell_h = params["image_width"] // grid_w, params["image_height"] // grid_h
    ys, xs = np.nonzero(keep(coverage[:grid_h, :grid_w]))
    corner = np.stack([xs * cell_w, ys * cell_h], axis=1).astype(np.float64)
    return bboxes[:4, ys, xs].T.astype(np.float64) + np.tile(corner, 2)


def vote(proposals: np.ndarray, params: dict) -> np.ndarray:
    """Merge proposals with cv2.groupRectangles: ``[x1, y1, x2, y2, log(votes)]`` rows."""
    # A diverged net's NaN or huge regressions propose nothing rather than overflow
    # OpenCV's int rectangles.
    proposals = proposals[np.all(np.abs(proposals) < 2**30, axis=1)]
    if not len(proposals):
        return np.zeros((0, 5))
    # groupRectangles takes integer (x, y, width, height) rectangles. DetectNet hands it the
    # corners (x1, y1, x2, y2) in those slots, and its eps and thresholds were tuned that
    # way, so the same numbers go in: similarity is judged on x1, y1, x1 + x2 and y1 + y2
    # with a tolerance from the smaller x2 and y2, and the cluster mean of each slot is the
    # mean corner. Coordinates truncate toward zero: int() of each, what DetectNet's floats
    # became in the Python 2 OpenCV bindings it ran on.
    rects = np.trunc(proposals).astype(np.int64).tolist()
    merged, votes = cv2.groupRectangles(rects, params["group_threshold"], params["eps"])
    rows = [[*rect, math.log(int(n))] for rect, n in
            zip(np.reshape(merged, (-1, 4)).tolist(), np.reshape(votes, -1).tolist())
            if rect[3] - rect[1] >= params["min_height"]]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def most_confident(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` rows: the most confident ones, in their original order."""
    if len(rows) <= limit:
        return rows
    keep = np.sort(np.argsort(-rows[:, 4], kind="stable")[:limit])
    return rows[keep]


def groundtruth_rows(coverage, bboxes, params, where: str, image: int) -> np.ndarray:
    """The distinct label rectangles of one image as ``[x1, y1, x2, y2, 0]`` rows: every
    covered cell of an object carries that object's rectangle, so duplicates collapse."""
    boxes = grid_proposals(coverage, bboxes, params, lambda c: c > 0)
    boxes = np.unique(boxes, axis=0) if len(boxes) else boxes.reshape(0, 4)
    if len(boxes) > params["max_boxes"]:
        raise ValueError(f"{where}: image {image} has {len(boxes)} ground-truth boxes, more "
                         f"than max_boxes={params['max_boxes']} (param_str's last field)")
    return np.hstack([boxes, np.zeros((len(boxes), 1))])


def detection_rows(coverage, bboxes, params, where: str, image: int) -> np.ndarray:
    proposals = grid_proposals(coverage, bboxes, params,
                               lambda c: c >= params["coverage_threshold"])
    return most_confident(vote(proposals, params), params["max_boxes"])


def layer_label(layer) -> str:
    """"<Class> layer '<name>'" for error messages (bad input names the prototxt layer)."""
    name = layer.layer_param.name if layer.layer_param is not None else "?"
    return f"{type(layer).__name__} layer '{name}'"


class _GridLayer(PythonLayer):
    """Per class, the rows of each image, zero-padded to ``max_boxes``: one top per class."""

    FIELDS: tuple = ()
    rows_of = None                 # (coverage HxW, bboxes 4xHxW, params, where, image) -> rows

    def setup(self, bottom, top):
        self.params = parse_param_str(self.param_str, self.FIELDS, layer_label(self))
        if len(bottom) != 2:
            raise ValueError(f"{layer_label(self)}: needs 2 bottoms (coverage, bboxes), got "
                             f"{len(bottom)}")
        if len(top) != self.params["num_classes"]:
            raise ValueError(f"{layer_label(self)}: has {len(top)} tops for num_classes="
                             f"{self.params['num_classes']}; give one top per class")

    def reshape(self, bottom, top):
        coverage, bboxes = bottom[0].data, bottom[1].data
        classes = self.params["num_classes"]
        if coverage.ndim != 4 or coverage.shape[1] != classes:
            raise ValueError(f"{layer_label(self)}: coverage shape {list(coverage.shape)} should "
                             f"be N x num_classes ({classes}) x H x W")
        if bboxes.ndim != 4 or bboxes.shape[1] != 4 or bboxes.shape[0] != coverage.shape[0] \
                or bboxes.shape[2:] != coverage.shape[2:]:
            raise ValueError(f"{layer_label(self)}: bboxes shape {list(bboxes.shape)} should be "
                             f"N x 4 x H x W like coverage {list(coverage.shape)}")
        for blob in top:
            blob.reshape(coverage.shape[0], self.params["max_boxes"], 5)

    def forward(self, bottom, top):
        coverage, bboxes = bottom[0].data, bottom[1].data
        for cls, blob in enumerate(top):
            out = np.zeros(blob.data.shape)         # also clears the previous batch's rows
            for image in range(coverage.shape[0]):
                rows = self.rows_of(coverage[image, cls], bboxes[image], self.params,
                                    layer_label(self), image)
                out[image, :len(rows)] = rows
            blob.data[...] = out


class ClusterDetections(_GridLayer):
    """DetectNet's deploy-time output: clustered detections per class (module docstring)."""

    FIELDS = DETECTION_FIELDS
    rows_of = staticmethod(detection_rows)


class ClusterGroundtruth(_GridLayer):
    """DetectNet's validation-time label list per class (module docstring)."""

    FIELDS = GROUNDTRUTH_FIELDS
    rows_of = staticmethod(groundtruth_rows)


__all__ = ["ClusterDetections", "ClusterGroundtruth", "MAX_BOXES"]
