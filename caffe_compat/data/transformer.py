"""Caffe's DataTransformer: crop, mirror, mean subtraction and scale, in Caffe's order.

For one C×H×W image (uint8 or float):
1. random draws, in this order: ``mirror = mirror and rand(2)``, then ``h_off``, ``w_off``
   (crop offsets are random only in TRAIN; TEST takes the centre ``(H - crop) // 2``);
2. ``out = (pixel - mean) * scale`` in float32, where a mean file is the full C×H×W mean
   indexed at the crop offset and mean values are one per channel (or one for all);
3. the result is written horizontally flipped when mirroring. Mirroring is random in both
   phases: Caffe has no phase check there.
Landmarks (K×3 rows of x, y, visible) follow the same crop and flip; a flip also swaps each
left/right pair (0↔1, 2↔3, ...).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from caffe_compat.formats.errors import DataError

TRAIN, TEST = 0, 1

# TransformationParameter fields of weiliu89/caffe (SSD): the AnnotatedData layer applies them
# (data/annotated_transform.py); the layers built on this transformer refuse them by name.
_SSD_AUGMENTATIONS = ("resize_param", "noise_param", "emit_constraint", "crop_h", "crop_w",
                      "distort_param", "expand_param")
# DeepLab v2's: only its ImageSegData layer reads them (data/image_seg_data.py).
_DEEPLAB_AUGMENTATIONS = ("scale_factors", "crop_width", "crop_height")


@dataclass(frozen=True)
class Draw:
    """The random choices for one image."""
    mirror: bool
    h_off: int
    w_off: int


def load_mean_file(path: str) -> np.ndarray:
    """A mean.binaryproto as float32 C×H×W (the legacy num dimension must be 1)."""
    from caffe_compat.formats.blob_io import ProtoError, read_blobproto
    if not os.path.isfile(path):
        raise DataError(f"{path}: mean file does not exist")
    try:
        mean = read_blobproto(path)
    except (ProtoError, ValueError) as exc:
        raise DataError(f"{path}: not a mean BlobProto ({exc})") from None
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise DataError(f"{path}: mean has shape {tuple(mean.shape)}, expected 1×C×H×W")
    return np.ascontiguousarray(mean, dtype=np.float32)


def _dims(shape) -> str:
    return "×".join(str(int(d)) for d in shape)


class DataTransformer:
    """Built from a TransformationParameter; ``phase`` is TRAIN (0) or TEST (1)."""

    def __init__(self, param, phase: int, where: str = ""):
        self.phase = phase
        self.where = where  # "layer 'data' (Data)" for messages
        self.scale = np.float32(param.scale)
        self.mirror = bool(param.mirror)
        self.crop_size = int(param.crop_size)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise self._error("force_color and force_gray cannot both be set")
        ssd_only = [f.name for f, _ in param.ListFields() if f.name in _SSD_AUGMENTATIONS]
        if ssd_only:
            raise self._error(f"transform_param.{ssd_only[0]} is SSD's augmentation "
                              "(weiliu89/caffe): only an AnnotatedData layer applies it here")
        deeplab_only = [f.name for f, _ in param.ListFields() if f.name in _DEEPLAB_AUGMENTATIONS]
        if deeplab_only:
            raise self._error(f"transform_param.{deeplab_only[0]} is DeepLab v2's: only an "
                              "ImageSegData layer applies it")
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        if self.mean_file and len(param.mean_value):
            raise self._error("cannot specify mean_file and mean_value at the same time")
        self.mean = load_mean_file(self.mean_file) if self.mean_file else None
        self.mean_values = (np.asarray(param.mean_value, dtype=np.float32)
                            if len(param.mean_value) else None)

    def _error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}" if self.where else message)

    # -- shapes ---------------------------------------------------------------------
    def output_shape(self, shape) -> tuple[int, int, int]:
        """C×H'×W' for a C×H×W input, checking the mean and crop fit (Caffe's InferBlobShape)."""
        c, h, w = (int(d) for d in shape)
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise DataError(f"{self.mean_file}: mean is {_dims(self.mean.shape)} but the data "
                            f"is {_dims((c, h, w))} (compute the mean over this data)")
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise self._error(f"specify either 1 mean_value or as many as channels: {c} "
                              f"(got {len(self.mean_values)})")
        if self.crop_size:
            if self.crop_size > h or self.crop_size > w:
                raise self._error(f"crop_size {self.crop_size} is larger than the "
                                  f"{_dims((h, w))} image")
            return c, self.crop_size, self.crop_size
        return c, h, w

    # -- randomness ------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, shape) -> Draw:
        """Caffe's draws for one image: mirror first, then the crop offsets."""
        _, h, w = shape
        mirror = self.mirror and bool(rng.integers(2))
        h_off = w_off = 0
        if self.crop_size:
            if self.phase == TRAIN:
                h_off = int(rng.integers(h - self.crop_size + 1))
                w_off = int(rng.integers(w - self.crop_size + 1))
            else:
                h_off = (h - self.crop_size) // 2
                w_off = (w - self.crop_size) // 2
        return Draw(mirror, h_off, w_off)

    # -- the transform ----------------------------------------------------------------
    def apply(self, img: np.ndarray, d: Draw, out: np.ndarray | None = None) -> np.ndarray:
        """Transform one C×H×W image with the given draws; writes into ``out`` if given."""
        c, h, w = self.output_shape(img.shape)
        pixels = img[:, d.h_off:d.h_off + h, d.w_off:d.w_off + w].astype(np.float32)
        if self.mean is not None:
            pixels -= self.mean[:, d.h_off:d.h_off + h, d.w_off:d.w_off + w]
        elif self.mean_values is not None:
            pixels -= self.mean_values.reshape(-1, 1, 1)
        pixels *= self.scale
        if d.mirror:
            pixels = pixels[:, :, ::-1]
        if out is None:
            return np.ascontiguousarray(pixels)
        out[...] = pixels
        return out

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(img, self.draw(rng, img.shape))

    def apply_landmarks(self, landmarks: np.ndarray, d: Draw, shape) -> np.ndarray:
        """Move K×3 (x, y, visible) landmarks with the crop and flip of ``apply``."""
        _, h, w = self.output_shape(shape)
        out = np.array(landmarks, dtype=np.float32, copy=True)
        out[:, 0] -= d.w_off
        out[:, 1] -= d.h_off
        if d.mirror:
            from caffe_compat.data.landmarks import mirror_landmarks
            out = mirror_landmarks(out, w)
        return out
