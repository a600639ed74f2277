"""The YOLO Caffe ports' deploy-time layers: eric612/MobileNet-YOLO's Yolov3DetectionOutput
(YOLOv3 heads to detection rows) and the Region layer of openvinotoolkit/training_toolbox_caffe
(Darknet's YOLOv2 region activations).

Both compute ``exp`` as C's ``expf`` (``float_exp``, as this project's SSD layers), then
finish in double and round to float where the C++ stores a float; a build whose headers pick
the double ``exp`` overload can differ by one float ulp.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.ssd_detection import F32, float_exp, greedy_nms
from caffe_compat.engine.layers.stl_sort import sort_descending

MOBILENET_YOLO = "eric612/MobileNet-YOLO"
FLT_MAX = float(np.finfo(np.float32).max)


def float_sigmoid(x: np.ndarray) -> np.ndarray:
    """The ports' ``1. / (1. + exp(-x))`` on float32 ``x``: expf, then double, then float."""
    e = float_exp((-x).astype(F32)).astype(np.float64)
    return (1.0 / (1.0 + e)).astype(F32)


def yolo_iou_matrix(kept: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The fork's ``box_iou(kept, candidate)`` on centre boxes ``[x, y, w, h]``: ``[A, B]``,
    float32 step for step. Corners ``x ∓ w/2``; the larger left (on a failed comparison, NaN,
    the candidate's), the smaller right; no overlap when a side is negative; the union is
    ``w·h + w·h − intersection`` from the sizes, not from the corners."""
    a = [np.ascontiguousarray(kept[:, i])[:, None] for i in range(4)]
    b = [np.ascontiguousarray(candidates[:, i])[None, :] for i in range(4)]
    half = F32(2)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        def side(c1, s1, c2, s2):
            left = np.where(c1 - s1 / half > c2 - s2 / half, c1 - s1 / half, c2 - s2 / half)
            right = np.where(c1 + s1 / half < c2 + s2 / half, c1 + s1 / half, c2 + s2 / half)
            return right - left

        w, h = side(a[0], a[2], b[0], b[2]), side(a[1], a[3], b[1], b[3])
        inter = np.where((w < 0) | (h < 0), F32(0), w * h).astype(F32)
        union = (a[2] * a[3] + b[2] * b[3]) - inter
        return (inter / union).astype(F32)


@register
class Yolov3DetectionOutput(Layer):
    """eric612/MobileNet-YOLO's YOLOv3 detection head (``yolov3_detection_output_param``).

    Bottoms: one head per bottom, ``[N, num_box·(5 + C), H, W]`` (C = ``num_classes``): for
    anchor n the channels ``tx, ty, tw, th, objectness, C class scores``. Head t's anchor n
    is anchor pair ``mask[n + t·len(mask)/mask_group_num]`` of ``biases``; the head's input
    size is ``W·anchors_scale[t]`` by ``H·anchors_scale[t]``. Each cell (x, y) and anchor
    decodes to the centre box ``((x + σ(tx))/W, (y + σ(ty))/H, e^tw·bw/(W·s), e^th·bh/(H·s))``
    (the fork's ``correct_yolo_boxes`` with these sizes is the identity); each class with
    ``σ(objectness)·σ(class) > confidence_threshold`` gives a candidate, in the fork's order
    (head, cell, anchor, class). The candidates are sorted by score with ``std::sort``
    (libstdc++'s order among ties, ``stl_sort``) and go through one class-agnostic greedy
    NMS: a box whose ``yolo_iou_matrix`` overlap with a kept box is ``>= nms_threshold`` is
    dropped. Top ``[1, 1, D, 7]`` rows ``[image, class + 1, score, xmin, ymin, xmax, ymax]``
    in that order (not clipped); with no detection at all one row ``[i, -1, …, -1]`` per
    image, as the fork writes.

    Deliberate difference: the fork pools every image of the batch into one list, writes
    image id 0 for all and lets boxes of one image suppress another's; here each image is
    decoded, sorted and suppressed alone under its own id (identical for batch 1, the
    deploy nets' batch). ``gaussian_box`` is refused: the fork's CPU forward reads the
    objectness as class 0 and never sets it, and its GPU forward counts an uncertainty
    twice. No backward (the fork has none).
    """

    type = "Yolov3DetectionOutput"
    origin = MOBILENET_YOLO
    exports_to_onnx = False
    traceable = False
    num_bottoms = (1, None)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.yolov3_detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("yolov3_detection_output_param.num_classes must be set")
        if p.gaussian_box:
            raise self.error("gaussian_box: Gaussian YOLOv3 heads are not supported (the "
                             "fork's CPU and GPU forwards disagree)")
        self.classes, self.num_box = int(p.num_classes), int(p.num_box)
        self.confidence_threshold = F32(p.confidence_threshold)
        self.nms_threshold = float(p.nms_threshold)
        self.biases = np.asarray(p.biases, dtype=F32)
        self.scales = [int(s) for s in p.anchors_scale]
        self._check_anchors(p, len(bottom_shapes))
        self.top_shapes(bottom_shapes)

    def _check_anchors(self, p, heads: int) -> None:
        if self.num_box <= 0:
            raise self.error("num_box must be > 0")
        if p.mask_group_num != heads:
            raise self.error(f"mask_group_num ({p.mask_group_num}) must equal the number of "
                             f"bottoms ({heads})")
        self.group = len(p.mask) // heads       # the fork's mask offset per head
        used = (heads - 1) * self.group + self.num_box
        if len(p.mask) < used:
            raise self.error(f"mask has {len(p.mask)} entries; {heads} heads of num_box "
                             f"{self.num_box} read {used}")
        self.masks = [[int(p.mask[t * self.group + n]) for n in range(self.num_box)]
                      for t in range(heads)]
        highest = max(max(m) for m in self.masks)
        if 2 * highest + 1 >= len(self.biases):
            raise self.error(f"biases has {len(self.biases)} values; mask {highest} needs "
                             f"{2 * highest + 2}")
        if len(self.scales) < heads or min(self.scales[:heads]) <= 0:
            raise self.error(f"anchors_scale needs a positive value for each of the {heads} "
                             f"bottoms, got {self.scales}")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        channels = self.num_box * (5 + self.classes)
        for t, shape in enumerate(bottom_shapes):
            if len(shape) != 4 or shape[1] != channels:
                raise self.error(f"bottom {t} must be [N, num_box·(5 + num_classes) = "
                                 f"{channels}, H, W], got {list(shape)}")
            if shape[0] != bottom_shapes[0][0]:
                raise self.error(f"bottom {t} has batch {shape[0]}, bottom 0 {bottom_shapes[0][0]}")
        return [(1, 1, 1, 7)]

    def _head_candidates(self, head: np.ndarray, t: int) -> tuple[np.ndarray, ...]:
        """One image's head ``[A·(5+C), H, W]`` (float32): its candidates' centre boxes
        ``[K, 4]``, classes and scores, in the fork's (cell, anchor, class) order."""
        _, h, w = head.shape
        a, c = self.num_box, self.classes
        x = head.reshape(a, 5 + c, h * w)
        act = float_sigmoid(x)
        scores = (act[:, 5:] * act[:, 4:5]).transpose(2, 0, 1)          # (cell, anchor, class)
        cell, anchor, cls = np.nonzero(scores > self.confidence_threshold)
        col, row = (cell % w).astype(F32), (cell // w).astype(F32)
        pairs = np.asarray(self.masks[t])[anchor]
        net_w, net_h = F32(w * self.scales[t]), F32(h * self.scales[t])
        with np.errstate(over="ignore"):           # a huge tw, th gives inf, as in the fork
            boxes = np.stack([
                (col + act[anchor, 0, cell]) / F32(w),
                (row + act[anchor, 1, cell]) / F32(h),
                float_exp(x[anchor, 2, cell]) * self.biases[2 * pairs] / net_w,
                float_exp(x[anchor, 3, cell]) * self.biases[2 * pairs + 1] / net_h,
            ], axis=1).astype(F32)
        return boxes, cls, scores[cell, anchor, cls]

    def image_detections(self, heads: Sequence[np.ndarray]) -> np.ndarray:
        """``[D, 6]`` float32 rows ``[class + 1, score, xmin, ymin, xmax, ymax]`` of one image."""
        parts = [self._head_candidates(head, t) for t, head in enumerate(heads)]
        boxes, classes, scores = (np.concatenate([p[i] for p in parts]) for i in range(3))
        order = sort_descending(scores)
        boxes, classes, scores = boxes[order], classes[order], scores[order]
        kept = greedy_nms(boxes, self.nms_threshold, 1.0, yolo_iou_matrix, strike_ties=True)
        b = boxes[kept]
        half_w, half_h = b[:, 2] / F32(2), b[:, 3] / F32(2)
        return np.stack([(classes[kept] + 1).astype(F32), scores[kept], b[:, 0] - half_w,
                         b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], axis=1)

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        heads = [b.detach().to("cpu", torch.float32).numpy() for b in bottoms]
        n = heads[0].shape[0]
        rows = []
        for i in range(n):
            found = self.image_detections([h[i] for h in heads])
            rows.append(np.concatenate([np.full((len(found), 1), i, dtype=F32), found], 1))
        out = np.concatenate(rows).astype(F32)
        if not len(out):
            out = np.array([[i] + [-1] * 6 for i in range(n)], dtype=F32)
        return torch.from_numpy(out).view(1, 1, len(out), 7).to(bottoms[0].device,
                                                                bottoms[0].dtype)


@register
class Region(Layer):
    """The Region layer of openvinotoolkit/training_toolbox_caffe (``region_param``: coords,
    classes, num), which is the activation half of Darknet's YOLOv2 ``region`` layer.

    Bottom ``[N, num·(coords + classes + 1), H, W]``, top the same shape: a copy in which,
    for each anchor, entries 0 and 1 (tx, ty) and entry ``coords`` (objectness) go through
    the logistic and entries ``coords+1 …`` through a softmax over the classes at each cell
    (the largest value, at least ``-FLT_MAX``, subtracted; float32 sums in class order), read
    from the bottom, in that order, as the fork does. No box decoding and no NMS: that is
    the caller's, as in Darknet. No backward (the fork's is empty).

    Other YOLOv2 ports register an incompatible ``Region`` under the same name (a channel-last
    flatten with ``boxes_of_each_grid``; thresholds and NMS in the layer; two tops); their
    fields are reported by name as not implemented (``formats/forks.py``).
    """

    type = "Region"
    origin = "openvinotoolkit/training_toolbox_caffe"
    exports_to_onnx = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.region_param
        self.coords, self.classes, self.num = int(p.coords), int(p.classes), int(p.num)
        if self.coords < 0 or self.classes < 0 or self.num <= 0:
            raise self.error(f"region_param needs coords >= 0, classes >= 0 and num > 0, got "
                             f"{self.coords}, {self.classes}, {self.num}")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        entries = self.coords + self.classes + 1
        if len(shape) != 4 or shape[1] != self.num * entries:
            raise self.error(f"bottom must be [N, num·(coords + classes + 1) = "
                             f"{self.num * entries}, H, W], got {list(shape)}")
        return [shape]

    @staticmethod
    def _sigmoid(x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(-x.double()).float().double()       # expf, then the double division
        return (1.0 / (1.0 + e)).float()

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Darknet's softmax over dim 1 of float32 ``x`` ``[N·num, classes, H·W]``."""
        largest = x.max(dim=1, keepdim=True).values.clamp(min=-FLT_MAX)
        e = torch.exp((x - largest).double()).float()
        total = torch.zeros_like(e[:, 0])
        for c in range(e.shape[1]):                         # float32, in class order
            total = total + e[:, c]
        return e / total[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k = self.coords
        bottom = x.detach().float().reshape(n * self.num, -1, h * w)
        top = bottom.clone()
        top[:, 0:2] = self._sigmoid(top[:, 0:2])
        top[:, k] = self._sigmoid(top[:, k])
        if self.classes:
            top[:, k + 1:] = self._softmax(bottom[:, k + 1:])
        return top.reshape(x.shape).to(x.dtype)
