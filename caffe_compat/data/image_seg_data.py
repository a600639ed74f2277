"""DeepLab v2's ImageSegData layer (deeplab-public-ver2 ``image_seg_data_layer.cpp`` and
``DataTransformer::TransformImgAndSeg``; the same files in hszhao/PSPNet).

``image_data_param`` names the list (``image label`` per line, words past the second ignored;
paths are ``root_folder`` + the word, string concatenation as in the fork, so DeepLab's
``/JPEGImages/x.jpg`` lists work with ``root_folder: "/data/VOC2012"``). ``label_type``:
PIXEL reads the label image (grey), IMAGE fills it with the line's class, NONE with
``ignore_label``. ``new_height``/``new_width`` resize both bilinearly (the label image too, as
the fork's ReadImageToCVMat does). Per image, the fork's order of random draws: mirror (when
``transform_param.mirror``), one of ``scale_factors`` (image bilinear, labels nearest, sizes
truncated to int in float32), then the crop. Images smaller than the crop
(``crop_size``, or ``crop_height`` with ``crop_width``) are padded at the bottom and right with
``mean_value`` (labels with ``ignore_label``); the crop is random in TRAIN, central in TEST.
Pixels become ``(pixel - mean_value[c]) * scale``; labels keep their values. Without a crop
every image must be at least the first one's size (a larger one gives its top-left part, as
the fork's copy loop does). Tops: data ``[N, C, h, w]``, label ``[N, 1, h, w]`` and, third,
each image's ``[min(h, rows), min(w, cols)]`` as ``[N, 1, 1, 2]`` (rows and columns after
new_height/new_width, before scaling); the fork adds unnamed tops when fewer are named.
The random draws are ours (seeded per batch), not Caffe's RNG.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from caffe_compat.data.dense_image_data import ListCursor, read_pair_list
from caffe_compat.data.image_list import parse_label
from caffe_compat.data.source_layer import _DataLayer
from caffe_compat.engine.layers.base import TRAIN, Shape, register
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.images import hwc_to_chw, read_image
from caffe_compat.proto import caffe_pb2

_LABEL = caffe_pb2.ImageDataParameter


def _crop_size(tp) -> tuple[int, int] | None:
    """(height, width) of the crop, None for none; the fork's rule for the three fields."""
    sides = tp.HasField("crop_height"), tp.HasField("crop_width")
    if any(sides) and (not all(sides) or tp.HasField("crop_size")):
        raise ValueError("give either crop_size or both crop_height and crop_width")
    if all(sides):
        size = (tp.crop_height, tp.crop_width)
    else:
        size = (tp.crop_size, tp.crop_size)
    return size if size[0] and size[1] else None


@register
class ImageSegData(_DataLayer):
    """Image + segmentation pairs from a list, with DeepLab's scale/pad/crop/mirror."""

    type = "ImageSegData"
    family = "data"
    origin = "DeepLab v2"
    num_tops = (1, 3)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p, tp = param.image_data_param, param.transform_param
        if tp.HasField("mean_file"):
            raise self.error("transform_param.mean_file is not supported by ImageSegData "
                             "(DeepLab refuses it too); use mean_value")
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("image_data_param new_height and new_width go together")
        if p.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        try:
            self.crop = _crop_size(tp)
        except ValueError as exc:
            raise self.error(f"transform_param: {exc}") from None
        self.p, self.tp = p, tp
        self.mean = np.asarray(list(tp.mean_value), dtype=np.float64)
        try:
            self.pairs = read_pair_list(p.source, (1 if p.label_type == _LABEL.NONE else 2, 1 << 30))
            self.cursor = ListCursor(len(self.pairs), p.shuffle, p.rand_skip, self._seq(0, 0))
            first = self._read(self.cursor.peek())[0]
        except DataError as exc:
            raise self._wrap(exc) from None
        c = 1 if first.ndim == 2 else first.shape[2]
        if self.mean.size not in (0, 1, c):
            raise self.error(f"{self.mean.size} mean_value(s) for a {c}-channel image")
        h, w = self.crop or first.shape[:2]
        self.out_size = (h, w)
        n = p.batch_size
        self._shapes = [(n, c, h, w), (n, 1, h, w), (n, 1, 1, 2)]
        self._batches = 0

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (H×W×C or H×W uint8) and its label image (H×W uint8)."""
        image, second, where = self.pairs[index]
        p, root = self.p, self.p.root_folder
        img = read_image(root + image, p.new_height, p.new_width, p.is_color, where)
        if p.label_type == _LABEL.PIXEL:
            seg = read_image(root + second, p.new_height, p.new_width, False, where)
            if seg.shape[:2] != img.shape[:2]:
                raise DataError(f"{where}: image is {img.shape[1]}×{img.shape[0]} but its label "
                                f"image is {seg.shape[1]}×{seg.shape[0]}")
        else:   # one class for the image, or ignore_label; saturated to 8 bits as cv::Scalar
            value = parse_label(second, where) if p.label_type == _LABEL.IMAGE else p.ignore_label
            seg = np.full(img.shape[:2], np.clip(value, 0, 255), np.uint8)
        return img, seg

    def _transform(self, img: np.ndarray, seg: np.ndarray, rng: np.random.Generator):
        """TransformImgAndSeg: (data C×h×w float32, label 1×h×w float32)."""
        mirror = bool(self.tp.mirror and rng.integers(2))
        if len(self.tp.scale_factors):
            factor = np.float32(self.tp.scale_factors[int(rng.integers(len(self.tp.scale_factors)))])
            if factor != 1:
                size = (int(np.float32(img.shape[1]) * factor), int(np.float32(img.shape[0]) * factor))
                if min(size) <= 0:
                    raise DataError(f"scale factor {factor:g} leaves no pixel of a "
                                    f"{img.shape[1]}×{img.shape[0]} image")
                img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
                seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)
        data = hwc_to_chw(img).astype(np.float64)
        label = seg[np.newaxis].astype(np.float64)
        data, label = self._pad(data, label)
        (y, x), (h, w) = self._offsets(data.shape[1:], rng), self.out_size
        if data.shape[1] - y < h or data.shape[2] - x < w:
            raise DataError(f"image is {data.shape[2]}×{data.shape[1]}, smaller than the first "
                            f"one's {w}×{h}; give a crop (DeepLab reads past its end)")
        data, label = data[:, y:y + h, x:x + w], label[:, y:y + h, x:x + w]
        if mirror:
            data, label = data[:, :, ::-1], label[:, :, ::-1]
        data = data.astype(np.float32)
        if self.mean.size:
            data = data - np.resize(self.mean, data.shape[0]).astype(np.float32).reshape(-1, 1, 1)
        return data * np.float32(self.tp.scale), label.astype(np.float32)

    def _pad(self, data: np.ndarray, label: np.ndarray):
        """Bottom/right padding up to the crop: mean_value for the image, ignore_label for
        the labels (the fork's copyMakeBorder)."""
        if self.crop is None:
            return data, label
        pad_h, pad_w = (max(c - s, 0) for c, s in zip(self.crop, data.shape[1:]))
        if not (pad_h or pad_w):
            return data, label
        if not self.mean.size:
            raise DataError(f"image {data.shape[2]}×{data.shape[1]} is smaller than the crop "
                            f"{self.crop[1]}×{self.crop[0]}: DeepLab pads it with mean_value, "
                            "which transform_param lacks")
        widths = ((0, 0), (0, pad_h), (0, pad_w))
        fill = np.resize(self.mean, data.shape[0]).reshape(-1, 1, 1)
        data = np.pad(data - fill, widths) + fill
        label = np.pad(label, widths, constant_values=np.clip(self.p.ignore_label, 0, 255))
        return data, label

    def _offsets(self, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        if self.crop is None:
            return 0, 0
        if self.phase == TRAIN:
            return (int(rng.integers(size[0] - self.crop[0] + 1)),
                    int(rng.integers(size[1] - self.crop[1] + 1)))
        return (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2

    def forward(self):
        rng = self._seq(1, self._batches)
        self._batches += 1
        data, labels, dims = [], [], []
        try:
            for _ in range(self.p.batch_size):
                img, seg = self._read(self.cursor.advance())
                dims.append([min(self.out_size[0], img.shape[0]), min(self.out_size[1], img.shape[1])])
                d, l = self._transform(img, seg, rng)
                data.append(d)
                labels.append(l)
        except DataError as exc:
            raise self._wrap(exc) from None
        dim = np.asarray(dims, np.float32).reshape(-1, 1, 1, 2)
        return self._tops((np.stack(data), np.stack(labels), dim))

    def seek(self, batch: int) -> None:
        self.cursor.seek(batch, self.p.batch_size)
        self._batches = batch
