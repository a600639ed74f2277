"""NVIDIA/caffe's DetectNet training layers (DIGITS' object-detection train_val nets):
``L1Loss`` and ``DetectNetTransformation`` (images + box labels -> the network's input and
its ground-truth grid, ``detectnet_coverage``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import TRAIN, Layer, Shape, legacy_shape, register
from caffe_compat.engine.layers.detectnet_coverage import CoverageGrid, label_rows
from caffe_compat.engine.layers.loss import EuclideanLoss

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


def _round_away(v: float) -> int:
    """C's ``round``: halves away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


@register
class DetectNetTransformation(Layer):
    """Bottoms: images ``[N, 3, H, W]`` (0–255) and box labels (per image a header row
    ``[count, 16, …]`` then ``count`` rows ``x y w h alpha class scenario roty truncated
    occlusion dim×3 loc×3``; DIGITS writes ``[N, 1, rows, 16]``). Tops: the images minus
    ``transform_param.mean_value`` (one value or three), cropped/zero-padded to
    ``image_size_y`` × ``image_size_x``, and the ground-truth grid
    ``[N, 8 + classes, image_size_y/stride, image_size_x/stride]``.

    TEST: crop at the origin; the input must already be image_size (the fork resizes with
    bicubic interpolation; not implemented, refused). TRAIN, as the fork's CPU code: mirror with
    ``flip_prob`` (boxes to ``W - x - w - 1``), then a crop of image_size at
    ``round(p·(W - image_size_x + shift_x) - shift_x/2)`` (p uniform with ``crop_prob``, else
    0.5 and no shift), likewise in y. Draws come from torch's generator (the fork's boost
    stream is not reproduced); a probability of 0 never fires, 1 always. Not implemented,
    refused in TRAIN when they could change an image: hue rotation, desaturation, scaling,
    rotation (the proto's defaults enable all four) and ``mean_file``. No gradient.
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
        if phase == TRAIN:
            self._refuse_augmentations()
        self.top_shapes(bottom_shapes)

    def _mean(self, t) -> np.ndarray:
        if t.HasField("mean_file"):
            raise self.error("transform_param.mean_file is not supported by "
                             "DetectNetTransformation here; give mean_value (1 or 3 values)")
        if len(t.mean_value) not in (0, 1, 3):
            raise self.error(f"transform_param.mean_value has {len(t.mean_value)} values; "
                             "give 1 or 3 (the fork ignores other counts)")
        values = list(t.mean_value) or [0.0]
        return np.array(values * (3 // len(values)), dtype=np.float64)

    def _refuse_augmentations(self) -> None:
        a = self.aug
        active = [name for name, prob, amount in (
            ("hue_rotation_prob", a.hue_rotation_prob, a.hue_rotation),
            ("desaturation_prob", a.desaturation_prob, a.desaturation_max),
            ("scale_prob", a.scale_prob, abs(a.scale_min - 1) + abs(a.scale_max - 1)),
            ("rotation_prob", a.rotation_prob, a.max_rotate_degree)) if prob > 0 and amount]
        if active:
            raise self.error(f"detectnet_augmentation_param: {', '.join(active)} > 0 (random "
                             "hue/desaturation/scale/rotation augmentation) is not implemented; "
                             "set them to 0 (flip_prob and the crop are supported)")

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        n, c, h, w = self._legacy(bottom_shapes[0], "the image blob")
        label = self._legacy(bottom_shapes[1], "the label blob")
        if c != 3:
            raise self.error(f"the image blob {list(bottom_shapes[0])} must have 3 channels")
        if label[0] != n:
            raise self.error(f"{n} images but {label[0]} labels (bottom 1 "
                             f"{list(bottom_shapes[1])})")
        if self.phase != TRAIN and (w, h) != self.size:
            raise self.error(f"TEST-phase images of {h}x{w} must be image_size_y x image_size_x "
                             f"({self.size[1]}x{self.size[0]}): the fork's bicubic resize is "
                             "not implemented")
        return [(n, 3, self.size[1], self.size[0]), (n,) + self.grid.shape()]

    def _legacy(self, shape: Shape, what: str) -> tuple[int, int, int, int]:
        try:
            return legacy_shape(tuple(shape))
        except ValueError:
            raise self.error(f"{what} has {len(shape)} axes; at most 4 (N, C, H, W)") from None

    def _draw(self, prob: float) -> bool:
        return prob > 0 and float(torch.rand(())) < prob

    def _choice(self, width: int, height: int) -> tuple[bool, tuple[int, int]]:
        """(mirror, crop offset) for one image, as the fork's get_augmentations."""
        if self.phase != TRAIN:
            return False, (0, 0)
        flip = self._draw(self.aug.flip_prob)
        if self._draw(self.aug.crop_prob):
            pct = (float(torch.rand(())), float(torch.rand(())))
            shift = (int(self.aug.shift_x), int(self.aug.shift_y))
        else:
            pct, shift = (0.5, 0.5), (0, 0)
        offset = tuple(_round_away(p * (full - size + s) - s // 2) for p, full, size, s in
                       zip(pct, (width, height), self.size, shift))
        return flip, offset

    def _image(self, img: np.ndarray, flip: bool, offset: tuple[int, int]) -> np.ndarray:
        """Mean-subtracted, mirrored, then cropped (zeros outside the input)."""
        img = (img / 255 - (self.mean / 255)[:, None, None]) * 255
        if flip:
            img = img[:, :, ::-1]
        out = np.zeros((3, self.size[1], self.size[0]))
        (ox, oy), (_, h, w) = offset, img.shape
        x0, y0 = max(ox, 0), max(oy, 0)
        x1, y1 = min(ox + self.size[0], w), min(oy + self.size[1], h)
        if x1 > x0 and y1 > y0:
            out[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = img[:, y0:y1, x0:x1]
        return out

    def _boxes(self, rows: np.ndarray, width: int, flip: bool,
               offset: tuple[int, int]) -> np.ndarray:
        rows = rows.copy()
        if flip:                  # the fork's mirror keeps its off-by-one (W - x - w - 1)
            rows[:, 0] = width - rows[:, 0] - rows[:, 2] - 1
        rows[:, 0] -= offset[0]
        rows[:, 1] -= offset[1]
        return rows

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        self.top_shapes([tuple(images.shape), tuple(labels.shape)])
        n, _, h, w = legacy_shape(tuple(images.shape))
        imgs = images.detach().reshape(n, 3, h, w).cpu().double().numpy()
        labs = labels.detach().reshape(n, -1).cpu().double().numpy()
        out_img = np.zeros((n, 3, self.size[1], self.size[0]))
        out_lab = np.zeros((n,) + self.grid.shape())
        for i in range(n):
            flip, offset = self._choice(w, h)
            out_img[i] = self._image(imgs[i], flip, offset)
            rows = self._boxes(label_rows(self, labs[i]), w, flip, offset)
            out_lab[i] = self.grid.generate(rows)
        like = dict(dtype=images.dtype, device=images.device)
        return torch.from_numpy(out_img).to(**like), torch.from_numpy(out_lab).to(**like)
