"""NVIDIA/caffe's DetectNet training layers (DIGITS' object-detection train_val nets):
``L1Loss`` and ``DetectNetTransformation`` (images + box labels -> the network's input and
its ground-truth grid, ``detectnet_coverage``).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from caffe_compat.engine.layers.base import TRAIN, Layer, Shape, legacy_shape, register
from caffe_compat.engine.layers.detectnet_augment import (Augment, c_round, rotated_size,
                                                          transform_boxes, transform_image)
from caffe_compat.engine.layers.detectnet_coverage import CoverageGrid, label_rows
from caffe_compat.engine.layers.loss import EuclideanLoss
from caffe_compat.formats.blob_io import ProtoError, read_blobproto

NVIDIA = "NVIDIA/caffe"


@register
class L1Loss(EuclideanLoss):
    """``Σ|a - b| / N`` (N = bottom 0's first axis; bottoms of equal size per sample, as
    EuclideanLoss's). Both bottoms get a gradient, ``±sign(a - b)·w/N`` (w the top's diff;
    sign 0 where a = b), as the fork's."""

    type = "L1Loss"
    family = "loss"
    origin = NVIDIA

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.top_shapes([tuple(a.shape), tuple(b.shape)])
        return (a - b.reshape(a.shape)).abs().sum() / a.shape[0]


@register
class DetectNetTransformation(Layer):
    """Bottoms: images ``[N, 3, H, W]`` (0–255) and box labels (per image a header row
    ``[count, 16, …]`` then ``count`` rows ``x y w h alpha class scenario roty truncated
    occlusion dim×3 loc×3``; DIGITS writes ``[N, 1, rows, 16]``). Tops: the images minus
    ``transform_param.mean_value`` (one value or three) or ``mean_file``, cropped/zero-padded to
    ``image_size_y`` × ``image_size_x``, and the ground-truth grid
    ``[N, 8 + classes, image_size_y/stride, image_size_x/stride]``.

    TEST: a bicubic resize to image_size. TRAIN, as the fork's CPU code, each with its
    probability: hue rotation (±``hue_rotation`` degrees) and desaturation (× 1 - u·
    ``desaturation_max``) in OpenCV's float HSV, then the mean, mirror (boxes to the fork's
    ``W - x - w - 1``), bicubic scaling by [``scale_min``, ``scale_max``], rotation by
    ±``max_rotate_degree`` onto the rotated bounding box (box centres rotated, sizes kept),
    and a crop of image_size at ``round(p·(W' - image_size_x + shift_x) - shift_x/2)`` (p
    uniform with ``crop_prob``, else 0.5 and no shift), likewise in y, zeros outside. Draws
    come from torch's generator (the fork's boost stream is not reproduced); a probability
    of 0 never fires, 1 always. ``mean_file``: its first image, bicubic-resized to the
    input's size, subtracted per pixel. No gradient.
    """

    type = "DetectNetTransformation"
    family = "common"
    origin = NVIDIA
    num_bottoms = (2, 2)
    num_tops = (2, 2)
    no_grad_bottoms = (0, 1)
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        g = param.detectnet_groundtruth_param
        if g.stride == 0:
            raise self.error("detectnet_groundtruth_param.stride must be positive")
        self.grid = CoverageGrid(g)
        self.size = (int(g.image_size_x), int(g.image_size_y))
        self.mean = self._mean(param.transform_param)
        self.aug = param.detectnet_augmentation_param
        self.top_shapes(bottom_shapes)

    def _mean(self, t) -> np.ndarray:
        """Per-channel values (3,), or the mean file's first image as H×W×3."""
        if t.HasField("mean_file"):
            try:
                mean = read_blobproto(t.mean_file)
            except (OSError, ProtoError, ValueError) as exc:
                raise self.error(f"transform_param.mean_file {t.mean_file}: {exc}") from None
            if mean.ndim < 3 or mean.reshape((-1,) + mean.shape[-3:]).shape[1] != 3:
                raise self.error(f"transform_param.mean_file {t.mean_file}: shape "
                                 f"{list(mean.shape)} is not a 3-channel image")
            return mean.reshape((-1,) + mean.shape[-3:])[0].transpose(1, 2, 0).astype(np.float64)
        if len(t.mean_value) not in (0, 1, 3):
            raise self.error(f"transform_param.mean_value has {len(t.mean_value)} values; "
                             "give 1 or 3 (the fork ignores other counts)")
        values = list(t.mean_value) or [0.0]
        return np.array(values * (3 // len(values)), dtype=np.float64)

    def _mean_at(self, width: int, height: int) -> np.ndarray:
        """The mean image resized (bicubic) to the input's size, as the fork's Reshape."""
        if self.mean.ndim == 1 or self.mean.shape[:2] == (height, width):
            return self.mean
        return cv2.resize(self.mean, (width, height), interpolation=cv2.INTER_CUBIC)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        n, c, h, w = self._legacy(bottom_shapes[0], "the image blob")
        label = self._legacy(bottom_shapes[1], "the label blob")
        if c != 3:
            raise self.error(f"the image blob {list(bottom_shapes[0])} must have 3 channels")
        if label[0] != n:
            raise self.error(f"{n} images but {label[0]} labels (bottom 1 "
                             f"{list(bottom_shapes[1])})")
        return [(n, 3, self.size[1], self.size[0]), (n,) + self.grid.shape()]

    def _legacy(self, shape: Shape, what: str) -> tuple[int, int, int, int]:
        try:
            return legacy_shape(tuple(shape))
        except ValueError:
            raise self.error(f"{what} has {len(shape)} axes; at most 4 (N, C, H, W)") from None

    def _draw(self, prob: float) -> bool:
        return prob > 0 and self._uniform() < prob

    @staticmethod
    def _uniform() -> float:
        return float(torch.rand((), dtype=torch.float64))

    def _choice(self, width: int, height: int) -> Augment:
        """One image's augmentation, drawn in the fork's order (get_augmentations)."""
        if self.phase != TRAIN:
            return Augment(scale=self.size)
        a, u = self.aug, self._uniform
        aug = Augment(scale=(width, height))
        if self._draw(a.hue_rotation_prob):
            aug.hue = max(min((u() - 0.5) * 2 * a.hue_rotation, 180.0), -180.0)
        if self._draw(a.desaturation_prob):
            aug.saturation = 1.0 - u() * a.desaturation_max
        aug.flip = self._draw(a.flip_prob)
        if self._draw(a.scale_prob):
            scale = float(np.float32(a.scale_min + (a.scale_max - a.scale_min) * u()))
            aug.scale = (c_round(width * scale), c_round(height * scale))
            if min(aug.scale) <= 0:
                raise self.error(f"detectnet_augmentation_param: scale {scale:g} of a "
                                 f"{width}x{height} image leaves no pixels (scale_min)")
        if self._draw(a.rotation_prob):
            aug.rotation = (u() - 0.5) * 2 * a.max_rotate_degree
        before = rotated_size(aug.scale, aug.rotation) if aug.rotates() else aug.scale
        if self._draw(a.crop_prob):
            pct, shift = (u(), u()), (int(a.shift_x), int(a.shift_y))
        else:
            pct, shift = (0.5, 0.5), (0, 0)
        aug.offset = tuple(c_round(p * (full - size + s) - s // 2) for p, full, size, s in
                           zip(pct, before, self.size, shift))
        return aug

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        self.top_shapes([tuple(images.shape), tuple(labels.shape)])
        n, _, h, w = legacy_shape(tuple(images.shape))
        imgs = images.detach().reshape(n, 3, h, w).cpu().double().numpy()
        labs = labels.detach().reshape(n, -1).cpu().double().numpy()
        out_img = np.zeros((n, 3, self.size[1], self.size[0]))
        out_lab = np.zeros((n,) + self.grid.shape())
        mean = self._mean_at(w, h)
        for i in range(n):
            aug = self._choice(w, h)
            out_img[i] = transform_image(imgs[i].transpose(1, 2, 0), mean, aug,
                                         self.size).transpose(2, 0, 1)
            out_lab[i] = self.grid.generate(transform_boxes(label_rows(self, labs[i]), aug, w, h))
        like = dict(dtype=images.dtype, device=images.device)
        return torch.from_numpy(out_img).to(**like), torch.from_numpy(out_lab).to(**like)
