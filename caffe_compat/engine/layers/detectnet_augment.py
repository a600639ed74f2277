"""DetectNetTransformation's image and box operations (NVIDIA/caffe
``detectnet_transform_layer.cpp``), with OpenCV as the fork: HSV hue rotation and
desaturation, mirror, bicubic scaling, rotation onto the rotated image's bounding box, crop.

Images are H×W×3 float arrays in the blob's channel order (read as BGR, DIGITS' order).
Box rows are the label rows (x, y, w, h first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

FLT_EPSILON = float(np.finfo(np.float32).eps)


def c_round(v: float) -> int:
    """C's ``round``: halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


@dataclass
class Augment:
    """One image's draws (the fork's AugmentSelection); ``scale`` is a (width, height)."""
    scale: tuple[int, int]
    hue: float = 0.0
    saturation: float = 1.0
    flip: bool = False
    rotation: float = 0.0
    offset: tuple[int, int] = (0, 0)

    def recolours(self) -> bool:
        return abs(self.hue) > FLT_EPSILON or self.saturation < 1.0 - 1.0 / 255

    def rotates(self) -> bool:
        return abs(self.rotation) > FLT_EPSILON


def _bounding(center, size, angle: float) -> tuple[int, int, int, int]:
    """``RotatedRect(center, size, angle).boundingRect()``: floor/ceil of the corners, one
    pixel wider and taller than their span (OpenCV's convention)."""
    pts = cv2.boxPoints((tuple(map(float, center)), tuple(map(float, size)), float(angle)))
    x0, y0 = math.floor(pts[:, 0].min()), math.floor(pts[:, 1].min())
    x1, y1 = math.ceil(pts[:, 0].max()), math.ceil(pts[:, 1].max())
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def rotated_size(size: tuple[int, int], angle: float) -> tuple[int, int]:
    """The fork's getRotatedSize: its centre is an integer Point (halves truncated)."""
    center = (int(0.5 * size[0]), int(0.5 * size[1]))
    return _bounding(center, size, angle)[2:]


def rotation_matrix(size: tuple[int, int], angle: float) -> np.ndarray:
    """The fork's getTransformationMatrix: the affine map of the upright rectangle's corners
    onto the rotated one's, moved so its bounding box starts at the origin (float32)."""
    center = np.float32(size[0]) * np.float32(0.5), np.float32(size[1]) * np.float32(0.5)
    src = cv2.boxPoints((center, tuple(map(float, size)), 0.0))
    x0, y0, _, _ = _bounding(center, size, angle)
    dst = cv2.boxPoints(((center[0] - x0, center[1] - y0), tuple(map(float, size)),
                         float(angle)))
    # the C++ overload reads the first three corners of each array
    return cv2.getAffineTransform(src[:3], dst[:3]).astype(np.float32)


def _recolour(img: np.ndarray, aug: Augment) -> np.ndarray:
    """Hue rotation (degrees) and saturation scaling in OpenCV's float HSV."""
    hsv = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2HSV)
    if abs(aug.hue) > FLT_EPSILON:
        # wrapped here: OpenCV 4's vectorised float HSV2BGR mishandles negative hues (its
        # scalar path, and the OpenCV 2/3 the fork built against, wrap them into [0, 360))
        hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(aug.hue), np.float32(360))
    if aug.saturation < 1.0 - 1.0 / 255:
        hsv[..., 1] *= np.float32(aug.saturation)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).astype(np.float64)


def crop(img: np.ndarray, size: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """The ``size`` window at ``offset``; zeros where it leaves the image."""
    out = np.zeros((size[1], size[0], 3))
    (ox, oy), (h, w) = offset, img.shape[:2]
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + size[0], w), min(oy + size[1], h)
    if x1 > x0 and y1 > y0:
        out[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = img[y0:y1, x0:x1]
    return out


def transform_image(img: np.ndarray, mean: np.ndarray, aug: Augment,
                    size: tuple[int, int]) -> np.ndarray:
    """0–255 H×W×3 in, the network's input out: to [0, 1], recolour, minus the mean, mirror,
    bicubic scale, rotate (zeros where nothing lands), crop, back to ×255."""
    img = img / 255
    if aug.recolours():
        img = _recolour(img, aug)
    img = img - mean / 255
    if aug.flip:
        img = img[:, ::-1]
    if (img.shape[1], img.shape[0]) != tuple(aug.scale):
        img = cv2.resize(np.ascontiguousarray(img), tuple(aug.scale),
                         interpolation=cv2.INTER_CUBIC)
    if aug.rotates():
        bound = rotated_size(aug.scale, aug.rotation)
        out = np.zeros((bound[1], bound[0], 3))
        img = cv2.warpAffine(np.ascontiguousarray(img),
                             rotation_matrix(aug.scale, aug.rotation).astype(np.float64),
                             bound, dst=out, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_TRANSPARENT)
    return crop(img, size, aug.offset) * 255


def transform_boxes(rows: np.ndarray, aug: Augment, width: int, height: int) -> np.ndarray:
    """The boxes through the same steps: mirror (the fork's ``W - x - w - 1``), scale,
    rotate the centre (size kept), shift by the crop offset."""
    rows = rows.copy()
    if aug.flip:
        rows[:, 0] = width - rows[:, 0] - rows[:, 2] - 1
    if tuple(aug.scale) != (width, height):
        sx, sy = aug.scale[0] / width, aug.scale[1] / height
        rows[:, [0, 2]] *= sx
        rows[:, [1, 3]] *= sy
    if aug.rotates():
        m = rotation_matrix(aug.scale, aug.rotation).astype(np.float64)
        cx, cy = rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2
        rows[:, 0] = m[0, 0] * cx + m[0, 1] * cy + m[0, 2] - rows[:, 2] / 2
        rows[:, 1] = m[1, 0] * cx + m[1, 1] * cy + m[1, 2] - rows[:, 3] / 2
    rows[:, 0] -= aug.offset[0]
    rows[:, 1] -= aug.offset[1]
    return rows
