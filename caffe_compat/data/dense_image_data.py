"""SegNet's DenseImageData layer (alexgkendall/caffe-segnet ``dense_image_data_layer.cpp``):
batches of (image, label image) pairs for segmentation, read from a list file.

The list holds ``image label_image`` per line (paths under ``root_folder``). The image is read
as colour (``is_color``) or grey, the label image always as grey; ``new_height``/``new_width``
resize both (bilinear for the image, nearest for labels, so class ids survive). With
``mirror`` a random half of the pairs are flipped left-right, and ``crop_height``/
``crop_width`` take the same random window of both, in either phase, as SegNet does. The image
then goes through ``transform_param``: ``mean_file`` (a C×H×W mean of the image as read, so
subtracted before any crop) or ``mean_value``, then ``scale``, as SegNet's data transformer
does; labels keep their raw values.
Lines are read in order (reshuffled each epoch with ``shuffle``); ``rand_skip`` skips a random
number of lines at the start. Tops: data ``[N, C, H, W]`` and label ``[N, 1, H, W]``.
SegNet refuses ``transform_param`` crop_size/mirror (they would treat the two images
differently); so does this layer.
"""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from caffe_compat.data.source_layer import _DataLayer
from caffe_compat.data.transformer import _dims, load_mean_file
from caffe_compat.engine.layers.base import Shape, register
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.images import hwc_to_chw, read_image


def read_pair_list(source: str, fields: tuple[int, int] = (2, 2)) -> list[tuple[str, str, str]]:
    """(image, label column or "", "file:line") per non-empty line of ``source``; each line
    has ``fields[0]`` to ``fields[1]`` words (words past the second are ignored)."""
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such list file")
    pairs = []
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            if not fields[0] <= len(words) <= fields[1]:
                wanted = "'image label_image'" if fields[0] > 1 else "'image [label]'"
                raise DataError(f"{source}:{number}: expected {wanted}, got {line.strip()!r}")
            pairs.append((words[0], words[1] if len(words) > 1 else "", f"{source}:{number}"))
    if not pairs:
        raise DataError(f"{source}: the list is empty")
    return pairs


class ListCursor:
    """Caffe's walk through a list: in order, or reshuffled every epoch with ``shuffle``;
    ``rand_skip`` skips a random number of lines at the start."""

    def __init__(self, size: int, shuffle: bool, rand_skip: int, rng: np.random.Generator):
        self.order, self.shuffle, self.rng = list(range(size)), shuffle, rng
        if shuffle:
            rng.shuffle(self.order)
        self.pos = int(rng.integers(rand_skip)) % size if rand_skip else 0

    def peek(self) -> int:
        """The line the next ``advance`` returns (for the shapes at setup)."""
        return self.order[self.pos % len(self.order)]

    def advance(self) -> int:
        if self.pos >= len(self.order):
            self.pos = 0
            if self.shuffle:
                self.rng.shuffle(self.order)
        self.pos += 1
        return self.order[self.pos - 1]

    def seek(self, batch: int, batch_size: int) -> None:
        self.pos = (batch * batch_size) % len(self.order)


@register
class DenseImageData(_DataLayer):
    """Image + label-image pairs from a list file (SegNet / Tiramisu training data)."""

    type = "DenseImageData"
    family = "data"
    origin = "alexgkendall/caffe-segnet"
    num_tops = (2, 2)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p, tp = param.dense_image_data_param, param.transform_param
        if tp.crop_size or tp.mirror:
            raise self.error("transform_param crop_size and mirror are not supported here (use "
                             "dense_image_data_param crop_height/crop_width/mirror)")
        if tp.mean_file and len(tp.mean_value):
            raise self.error("cannot specify mean_file and mean_value at the same time")
        if p.batch_size <= 0:
            raise self.error("dense_image_data_param.batch_size must be positive")
        if (p.new_height > 0) != (p.new_width > 0) or (p.crop_height > 0) != (p.crop_width > 0):
            raise self.error("give new_height with new_width and crop_height with crop_width")
        self.p = p
        self.scale = float(tp.scale)
        self.mean = np.asarray(list(tp.mean_value), dtype=np.float32)
        self.mean_image = None
        try:
            if tp.mean_file:
                self.mean_image = load_mean_file(tp.mean_file)
            self.pairs = read_pair_list(p.source)
            self._rng = self._seq(0, 0)
            self.cursor = ListCursor(len(self.pairs), p.shuffle, p.rand_skip, self._rng)
            first = self._load(self.cursor.peek())
        except DataError as exc:
            raise self._wrap(exc) from None
        c, h, w = first[0].shape
        if self.mean_image is not None and self.mean_image.shape != (c, h, w):
            raise self.error(f"{tp.mean_file}: mean is {_dims(self.mean_image.shape)} but the "
                             f"images are {c}×{h}×{w} (after new_height/new_width)")
        if p.crop_height:
            h, w = p.crop_height, p.crop_width
        if self.mean.size not in (0, 1, c):
            raise self.error(f"{self.mean.size} mean_value(s) for a {c}-channel image")
        self._shapes = [(p.batch_size, c, h, w), (p.batch_size, 1, h, w)]

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label, where = self.pairs[index]
        base = self.p.root_folder
        img = read_image(image, self.p.new_height, self.p.new_width, self.p.is_color, where, base)
        lab = read_image(label, 0, 0, False, where, base)
        if self.p.new_height:
            lab = cv2.resize(lab, (self.p.new_width, self.p.new_height),
                             interpolation=cv2.INTER_NEAREST)
        if img.shape[:2] != lab.shape[:2]:
            raise DataError(f"{where}: image is {img.shape[1]}×{img.shape[0]} but its label image "
                            f"is {lab.shape[1]}×{lab.shape[0]}")
        return hwc_to_chw(img).astype(np.float32), lab[np.newaxis].astype(np.float32)

    def _next_pair(self) -> tuple[np.ndarray, np.ndarray]:
        index = self.cursor.advance()
        img, lab = self._load(index)
        if self.mean_image is not None:
            if img.shape != self.mean_image.shape:
                where = self.pairs[index][2]
                raise DataError(f"{where}: image is {_dims(img.shape)}, the mean_file's mean "
                                f"{_dims(self.mean_image.shape)}")
            img = img - self.mean_image
        if self.p.mirror and self._rng.integers(2):
            img, lab = img[:, :, ::-1], lab[:, :, ::-1]
        if self.p.crop_height:
            ch, cw = self.p.crop_height, self.p.crop_width
            if ch > img.shape[1] or cw > img.shape[2]:
                raise DataError(f"crop {ch}×{cw} is larger than the image {img.shape[1]}×{img.shape[2]}")
            y = int(self._rng.integers(img.shape[1] - ch + 1))
            x = int(self._rng.integers(img.shape[2] - cw + 1))
            img, lab = img[:, y:y + ch, x:x + cw], lab[:, y:y + ch, x:x + cw]
        if self.mean.size:
            img = img - self.mean.reshape(-1, 1, 1)
        return img * np.float32(self.scale), lab

    def forward(self):
        data, labels = [], []
        try:
            for _ in range(self.p.batch_size):
                img, lab = self._next_pair()
                data.append(img)
                labels.append(lab)
        except DataError as exc:
            raise self._wrap(exc) from None
        shapes = {a.shape for a in data}
        if len(shapes) > 1:
            raise self.error(f"images of different sizes in one batch {sorted(shapes)}; set "
                             "new_height/new_width or crop_height/crop_width")
        return self._tops((np.stack(data), np.stack(labels)))

    def seek(self, batch: int) -> None:
        self.cursor.seek(batch, self.p.batch_size)
