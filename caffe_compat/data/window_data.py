"""WindowData (``window_data_layer.cpp``): R-CNN style crops of object windows from images.

The window file lists, per image, ``# <image_index>``, the image path, its channels, height
and width, the number of windows, then one ``label overlap x1 y1 x2 y2`` line per window
(inclusive pixel corners). Windows with ``overlap >= fg_threshold`` are foreground (label
> 0 required); those with ``overlap < bg_threshold`` are background (label 0); the rest are
unused. A batch holds ``batch_size - int(batch_size * fg_fraction)`` background windows
followed by the foreground ones, each drawn uniformly at random.

Each window is cut from the colour (BGR) image, bilinearly warped to ``crop_size`` square
(``transform_param.crop_size``, required) and optionally mirrored. ``context_pad`` grows the
window by ``crop_size / (crop_size - 2 context_pad)`` around its centre and ``crop_mode:
"square"`` makes it square first; the parts of the grown window outside the image stay 0
in the output. Pixels become ``(pixel - mean) * window_data_param.scale``, the mean from
``transform_param``'s mean_file (its centre crop, shifted like the window) or mean_value.
Random draws come from a generator seeded per batch (our stream, not Caffe's mt19937).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from caffe_compat.data.source_layer import _BATCH_STREAM, _DataLayer
from caffe_compat.data.transformer import load_mean_file
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.images import read_image
from caffe_compat.engine.layers.base import Shape, register

f32 = np.float32


@dataclass
class Window:
    image: int
    label: int
    overlap: float
    box: tuple[int, int, int, int]     # x1, y1, x2, y2 (inclusive)


def read_window_file(path: str, root: str, fg_threshold: float, bg_threshold: float):
    """(image paths, foreground windows, background windows) from a window file."""
    try:
        with open(path) as f:
            tokens = f.read().split()
    except OSError as exc:
        raise DataError(f"cannot open window file '{path}': {exc.strerror}") from None
    if not tokens:
        raise DataError(f"{path}: window file is empty")
    images, fg, bg, pos = [], [], [], 0
    try:
        while pos < len(tokens):
            if tokens[pos] != "#":
                raise DataError(f"{path}: expected '#' before image {len(images)}, found "
                                f"'{tokens[pos]}'")
            index, image_path = int(tokens[pos + 1]), tokens[pos + 2]
            channels, count = int(tokens[pos + 3]), int(tokens[pos + 6])
            if channels != 3:
                raise DataError(f"{path}: image '{image_path}' has {channels} channels; "
                                "WindowData reads every image as 3-channel colour")
            images.append(root + image_path)     # Caffe joins without a separator
            pos += 7
            for _ in range(count):
                label, overlap = int(tokens[pos]), float(tokens[pos + 1])
                box = tuple(int(t) for t in tokens[pos + 2:pos + 6])
                pos += 6
                if overlap >= f32(fg_threshold):
                    if label <= 0:
                        raise DataError(f"{path}: foreground window of '{image_path}' has "
                                        f"label {label}; foreground labels must be > 0")
                    fg.append(Window(index, label, overlap, box))
                elif overlap < f32(bg_threshold):
                    bg.append(Window(index, 0, 0.0, box))
    except DataError:
        raise
    except (IndexError, ValueError):
        raise DataError(f"{path}: truncated or malformed window file near image "
                        f"{len(images)}") from None
    return images, fg, bg


def _c_round(x) -> int:
    """C's round(): halves away from zero (Python's round goes to even)."""
    return int(math.copysign(math.floor(abs(float(x)) + 0.5), float(x)))


def window_geometry(box, image_hw, crop: int, context_pad: int, square: bool, mirror: bool):
    """Caffe's crop arithmetic in float32: (clipped box, resized (w, h), (pad_h, pad_w))."""
    x1, y1, x2, y2 = box
    if not (context_pad > 0 or square):
        return (x1, y1, x2, y2), (crop, crop), (0, 0)
    rows, cols = image_hw
    context_scale = f32(crop) / f32(crop - 2 * context_pad)
    half_h, half_w = f32(y2 - y1 + 1) / f32(2), f32(x2 - x1 + 1) / f32(2)
    cx, cy = f32(x1) + half_w, f32(y1) + half_h
    if square:
        half_h = half_w = max(half_h, half_w)
    x1, x2 = _c_round(cx - half_w * context_scale), _c_round(cx + half_w * context_scale)
    y1, y2 = _c_round(cy - half_h * context_scale), _c_round(cy + half_h * context_scale)
    full_h, full_w = y2 - y1 + 1, x2 - x1 + 1
    px1, py1 = max(0, -x1), max(0, -y1)
    px2, py2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
    x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
    sx, sy = f32(crop) / f32(full_w), f32(crop) / f32(full_h)
    width, height = _c_round(f32(x2 - x1 + 1) * sx), _c_round(f32(y2 - y1 + 1) * sy)
    px1, px2 = _c_round(f32(px1) * sx), _c_round(f32(px2) * sx)
    py1 = _c_round(f32(py1) * sy)
    pad_h, pad_w = py1, (px2 if mirror else px1)
    height, width = min(height, crop - pad_h), min(width, crop - pad_w)
    return (x1, y1, x2, y2), (width, height), (pad_h, pad_w)


@register
class WindowData(_DataLayer):
    """Tops: data ``(batch_size, 3, crop_size, crop_size)`` and label ``(batch_size,)``."""

    type = "WindowData"
    family = "data"
    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        wp, tp = param.window_data_param, param.transform_param
        self.crop, self.mirror = tp.crop_size, tp.mirror
        if self.crop <= 0:
            raise self.error("transform_param.crop_size must be set (> 0) for WindowData")
        if wp.batch_size <= 0:
            raise self.error("window_data_param.batch_size must be positive")
        if 2 * wp.context_pad >= self.crop:
            raise self.error(f"context_pad {wp.context_pad} leaves no room in crop_size "
                             f"{self.crop}")
        if wp.crop_mode not in ("warp", "square"):
            raise self.error(f"crop_mode must be 'warp' or 'square', got '{wp.crop_mode}'")
        self.batch_size, self.scale, self.context_pad = wp.batch_size, f32(wp.scale), wp.context_pad
        self.square = wp.crop_mode == "square"
        self.num_fg = int(f32(wp.batch_size) * f32(wp.fg_fraction))
        try:
            self.images, self.fg, self.bg = read_window_file(
                wp.source, wp.root_folder, wp.fg_threshold, wp.bg_threshold)
            self.mean_image = load_mean_file(tp.mean_file) if tp.HasField("mean_file") else None
        except DataError as exc:
            raise self._wrap(exc) from None
        if self.mean_image is not None and len(tp.mean_value):
            raise self.error("give mean_file or mean_value, not both")
        self.mean_values = self._mean_values(list(tp.mean_value))
        if not self.fg or not self.bg:
            raise self.error(f"{wp.source}: needs both foreground ({len(self.fg)}) and "
                             f"background ({len(self.bg)}) windows")
        self._cache: dict[int, np.ndarray] = {}
        self.cache_images = wp.cache_images
        self._batch = 0
        self._shapes = [(self.batch_size, 3, self.crop, self.crop), (self.batch_size,)]

    def _mean_values(self, values: list[float]) -> np.ndarray | None:
        if not values:
            return None
        if len(values) not in (1, 3):
            raise self.error(f"give 1 mean_value or 3 (one per channel), got {len(values)}")
        return np.asarray(values * (3 if len(values) == 1 else 1), dtype=f32)

    def _image(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        if not 0 <= index < len(self.images):
            raise self.error(f"window refers to image index {index}; the window file lists "
                             f"{len(self.images)} images (indices must count from 0)")
        try:
            img = read_image(self.images[index], is_color=True)
        except DataError as exc:
            raise self._wrap(exc) from None
        if self.cache_images:
            self._cache[index] = img
        return img

    def seek(self, batch: int) -> None:
        self._batch = batch

    def forward(self):
        rng = self._seq(_BATCH_STREAM, self._batch)
        self._batch += 1
        data = np.zeros(self._shapes[0], dtype=f32)
        labels = np.zeros(self.batch_size, dtype=f32)
        chosen = [(self.bg, self.batch_size - self.num_fg), (self.fg, self.num_fg)]
        item = 0
        for windows, count in chosen:
            for _ in range(count):
                window = windows[int(rng.integers(len(windows)))]
                flip = bool(self.mirror and rng.integers(2))
                self._crop_into(data[item], window, flip)
                labels[item] = window.label
                item += 1
        return self._tops((data, labels))

    def _crop_into(self, out: np.ndarray, window: Window, flip: bool) -> None:
        """Write one window's crop into ``out`` (3, crop, crop), already zero."""
        img = self._image(window.image)
        (x1, y1, x2, y2), size, (pad_h, pad_w) = window_geometry(
            window.box, img.shape[:2], self.crop, self.context_pad, self.square, flip)
        if not (0 <= x1 <= x2 < img.shape[1] and 0 <= y1 <= y2 < img.shape[0]):
            raise self.error(f"window {window.box} lies outside image "
                             f"'{self.images[window.image]}' ({img.shape[1]}×{img.shape[0]})")
        patch = cv2.resize(img[y1:y2 + 1, x1:x2 + 1], size, interpolation=cv2.INTER_LINEAR)
        if flip:
            patch = patch[:, ::-1]
        pixels = patch.transpose(2, 0, 1).astype(f32)                 # (3, h, w)
        h, w = pixels.shape[1:]
        if self.mean_image is not None:
            off = (self.mean_image.shape[2] - self.crop) // 2
            pixels = pixels - self.mean_image[:, off + pad_h:off + pad_h + h,
                                              off + pad_w:off + pad_w + w]
        elif self.mean_values is not None:
            pixels = pixels - self.mean_values[:, None, None]
        out[:, pad_h:pad_h + h, pad_w:pad_w + w] = pixels * self.scale

