"""The per-image pipeline of SSD's AnnotatedData layer (weiliu89/caffe): an image and its
boxes through distortion, expansion, a sampled crop, resize, mirror and mean/scale.

Order and rules follow the fork's ``annotated_data_layer.cpp`` and the annotated paths of
its ``data_transformer.cpp``:

1. ``distort_param``: photometric distortion (``im_transforms.distort``);
2. ``expand_param``: with probability ``prob`` the image goes onto a canvas up to
   ``max_expand_ratio`` times larger, filled with the mean values (0 without);
3. ``batch_sampler``: every sampler proposes crops; one of all accepted crops is taken
   uniformly at random and the image cut to it (none accepted: the image stays whole);
4. the final transform: mirror draw, ``resize_param``, ``noise_param``, ``crop_size`` (or
   ``crop_h``/``crop_w``; random in TRAIN, centred in TEST), ``(pixel - mean) * scale``.

After steps 2–4 the boxes are re-expressed in the new frame and clipped to it; a box that
fails ``emit_constraint`` or keeps no area is dropped. A flip maps x to 1 - x.

Records stored encoded are re-encoded as JPEG (quality 95) after steps 1, 2 and 3 when they
change the image, since the fork keeps the intermediate images as encoded Datums. Two raw
(not encoded) record rules differ in the fork: its expansion canvas is byte 32 (the fill of
its buffer, not the mean), kept here; its distortion leaves an empty image and its final
transform has no resize (both stop training there), where this pipeline distorts and resizes
raw pixels as it does decoded ones. Unlike the fork, a crop side rounding one ulp past the
image does not abort (``bbox.sample_box``).
"""
from __future__ import annotations

import cv2
import numpy as np

from caffe_compat.data import im_transforms as imt
from caffe_compat.data.bbox import (Boxes, check_sampler, clip, emitted, generate_crops, project,
                                    uniform)
from caffe_compat.data.transformer import TRAIN, load_mean_file
from caffe_compat.formats.errors import DataError

f32 = np.float32
RAW_CANVAS = 32   # the byte the fork's raw-record expansion leaves around the image


class AnnotatedTransformer:
    """Built from a TransformationParameter and the layer's batch samplers; ``item()``
    turns one decoded image (H×W×C uint8) and its Boxes into the C×H'×W' input and the
    boxes in its frame."""

    def __init__(self, tp, samplers, phase: int, channels: int, where: str):
        self.tp, self.samplers, self.phase, self.where = tp, list(samplers), phase, where
        self.flag = (cv2.IMREAD_COLOR if tp.force_color else
                     cv2.IMREAD_GRAYSCALE if tp.force_gray else cv2.IMREAD_UNCHANGED)
        crop = int(tp.crop_size)
        self.crop_hw = (crop, crop) if crop else (int(tp.crop_h), int(tp.crop_w))
        self.mean = load_mean_file(tp.mean_file) if tp.HasField("mean_file") else None
        values = np.asarray(tp.mean_value, dtype=f32)
        self.mean_values = np.resize(values, channels) if len(values) else None
        self._check(channels)

    def _check(self, channels: int) -> None:
        tp = self.tp
        if tp.force_color and tp.force_gray:
            raise self.error("force_color and force_gray cannot both be set")
        if self.mean is not None and len(tp.mean_value):
            raise self.error("cannot specify mean_file and mean_value at the same time")
        if len(tp.mean_value) not in (0, 1, channels):
            raise self.error(f"specify either 1 mean_value or as many as channels: "
                             f"{channels} (got {len(tp.mean_value)})")
        if self.mean is not None and tp.HasField("expand_param"):
            raise self.error("mean_file with expand_param: the fork fills the canvas from a "
                             "mean of the canvas's random size; use mean_value")
        if tp.HasField("expand_param") and tp.expand_param.max_expand_ratio <= 1:
            raise self.error("expand_param.max_expand_ratio must be > 1")
        for bs in self.samplers:
            check_sampler(bs, self.where)
        checks = (("distort_param", lambda p: imt.check_distort(p, channels, self.where)),
                  ("resize_param", lambda p: imt.check_resize(p, channels, self.where)),
                  ("noise_param", lambda p: imt.check_noise(p, self.where)))
        for field, check in checks:
            if tp.HasField(field):
                check(getattr(tp, field))

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")

    # -- shapes ---------------------------------------------------------------------
    def output_shape(self, img_shape) -> tuple[int, int, int]:
        """C×H×W of the input an H×W×C image becomes (the fork's InferBlobShape)."""
        h, w, c = img_shape
        if self.tp.HasField("resize_param"):
            h, w = imt.new_size(self.tp.resize_param, h, w)
        ch, cw = self.crop_hw
        if h < ch or w < cw:
            raise self.error(f"crop {ch}×{cw} is larger than the {h}×{w} image")
        return c, ch or h, cw or w

    # -- one image ---------------------------------------------------------------------
    def item(self, img: np.ndarray, boxes: Boxes, encoded: bool, rng: np.random.Generator):
        """(C×H×W float32, Boxes) for one record's image and boxes."""
        tp = self.tp
        if tp.HasField("distort_param"):
            img = self._stored(imt.distort(img, tp.distort_param, rng), encoded)
        if tp.HasField("expand_param"):
            img, boxes = self._expand(img, boxes, encoded, rng)
        if self.samplers:
            crops = generate_crops(boxes.xyxy, self.samplers, rng)
            if crops:
                window = crops[int(rng.integers(len(crops)))]
                boxes = self.annotate(boxes, clip(window))
                img = self._stored(imt.crop(img, window), encoded)
        return self.final(img, boxes, rng)

    def _stored(self, img: np.ndarray, encoded: bool) -> np.ndarray:
        return imt.jpeg_round_trip(img, self.flag) if encoded else img

    def _expand(self, img, boxes, encoded, rng):
        p = self.tp.expand_param
        if uniform(rng, 0, 1) > p.prob or abs(p.max_expand_ratio - 1) < 1e-2:
            return img, boxes
        ratio = uniform(rng, 1, p.max_expand_ratio)
        fill = np.full(img.shape[2], RAW_CANVAS, dtype=np.uint8)
        if encoded:
            fill = np.zeros(img.shape[2], dtype=np.uint8)
            if self.mean_values is not None:
                fill = np.clip(np.rint(self.mean_values), 0, 255).astype(np.uint8)
        canvas, window = imt.expand(img, ratio, fill, rng)
        return self._stored(canvas, encoded), self.annotate(boxes, window)

    def final(self, img: np.ndarray, boxes: Boxes, rng: np.random.Generator):
        """Step 4: mirror, resize, noise, crop, mean and scale; the boxes follow."""
        tp = self.tp
        mirror = bool(tp.mirror) and bool(rng.integers(2))
        src_hw = img.shape[:2]
        if tp.HasField("resize_param"):
            img = imt.resize(img, tp.resize_param, rng)
        if tp.HasField("noise_param"):
            img = imt.noise(img, tp.noise_param, rng)
        (h, w), (ch, cw) = img.shape[:2], self.crop_hw
        y = x = 0
        if ch > 0 and cw > 0:
            if h < ch or w < cw:
                raise self.error(f"crop {ch}×{cw} is larger than the {h}×{w} image")
            if self.phase == TRAIN:
                y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            else:
                y, x = (h - ch) // 2, (w - cw) // 2
        oh, ow = (ch, cw) if ch > 0 and cw > 0 else (h, w)
        window = np.array([f32(x) / f32(w), f32(y) / f32(h), f32(x + ow) / f32(w),
                           f32(y + oh) / f32(h)], dtype=f32)
        data = self._pixels(img[y:y + oh, x:x + ow], mirror, (y, x))
        return data, self.annotate(boxes, window, mirror, src_hw)

    def _pixels(self, img: np.ndarray, mirror: bool, offset) -> np.ndarray:
        pixels = img.transpose(2, 0, 1).astype(f32)
        if mirror:
            pixels = pixels[:, :, ::-1]
        if self.mean is not None:
            if self.mean.shape != pixels.shape or offset != (0, 0):
                raise self.error(f"mean file is {'×'.join(map(str, self.mean.shape))}, the "
                                 f"input {'×'.join(map(str, pixels.shape))} (and uncropped)")
            pixels = pixels - self.mean   # in output coordinates, as the fork indexes it
        elif self.mean_values is not None:
            pixels = pixels - self.mean_values.reshape(-1, 1, 1)
        return np.ascontiguousarray(pixels * f32(self.tp.scale), dtype=f32)

    # -- boxes -----------------------------------------------------------------------
    def annotate(self, boxes: Boxes, window: np.ndarray, mirror: bool = False,
                 resized_from=None) -> Boxes:
        """The boxes that survive a move to ``window`` (TransformAnnotation): the
        resize policy first when ``resized_from`` (the image's H, W before resizing) is
        given, then emit_constraint, projection and clipping, the flip, extrapolation."""
        xyxy = boxes.xyxy
        if resized_from is not None and self.tp.HasField("resize_param"):
            xyxy = resize_boxes(self.tp.resize_param, resized_from, xyxy)
        keep = np.ones(len(boxes), dtype=bool)
        if self.tp.HasField("emit_constraint"):
            keep &= emitted(window, xyxy, self.tp.emit_constraint)
        moved, inside = project(window, xyxy)
        keep &= inside
        if mirror:
            moved = np.stack([f32(1) - moved[:, 2], moved[:, 1], f32(1) - moved[:, 0],
                              moved[:, 3]], axis=1)
        if resized_from is not None and self.tp.HasField("resize_param"):
            moved = extrapolate(self.tp.resize_param, resized_from, window, moved)
        return boxes.keep(keep, moved)


def resize_boxes(p, hw, xyxy: np.ndarray) -> np.ndarray:
    """Boxes of an H×W image in the frame ``resize_param`` maps it to
    (UpdateBBoxByResizePolicy), clipped to that frame."""
    old_h, old_w = f32(hw[0]), f32(hw[1])
    new_h, new_w = f32(p.height), f32(p.width)
    aspect = old_w / old_h
    x0, y0 = xyxy[:, 0] * old_w, xyxy[:, 1] * old_h
    x1, y1 = xyxy[:, 2] * old_w, xyxy[:, 3] * old_h
    if p.resize_mode == imt.FIT_LARGE_SIZE_AND_PAD:
        if aspect > new_w / new_h:
            pad = (new_h - new_w / aspect) / f32(2)
            x0, x1 = _fit(x0, x1, new_w, old_w)
            y0 = pad + np.maximum(f32(0), y0 * (new_h - 2 * pad) / old_h)
            y1 = pad + np.minimum(new_h, y1 * (new_h - 2 * pad) / old_h)
        else:
            pad = (new_w - aspect * new_h) / f32(2)
            x0 = pad + np.maximum(f32(0), x0 * (new_w - 2 * pad) / old_w)
            x1 = pad + np.minimum(new_w, x1 * (new_w - 2 * pad) / old_w)
            y0, y1 = _fit(y0, y1, new_h, old_h)
    else:
        if p.resize_mode == imt.FIT_SMALL_SIZE:
            if aspect < new_w / new_h:
                new_h = new_w / aspect
            else:
                new_w = aspect * new_h
        x0, x1 = _fit(x0, x1, new_w, old_w)
        y0, y1 = _fit(y0, y1, new_h, old_h)
    return np.stack([x0 / new_w, y0 / new_h, x1 / new_w, y1 / new_h], axis=1).astype(f32)


def _fit(lo, hi, new, old):
    return np.maximum(f32(0), lo * new / old), np.minimum(new, hi * new / old)


def extrapolate(p, hw, window: np.ndarray, xyxy: np.ndarray) -> np.ndarray:
    """ExtrapolateBBox: with FIT_SMALL_SIZE and both ``height_scale``/``width_scale`` set,
    boxes are rescaled from the crop's size to those scales."""
    if not (p.height_scale > 0 and p.width_scale > 0 and p.resize_mode == imt.FIT_SMALL_SIZE):
        return xyxy
    new_h, new_w = f32(p.height), f32(p.width)
    aspect = f32(hw[1]) / f32(hw[0])
    if aspect < new_w / new_h:     # the unrounded size FIT_SMALL_SIZE resizes to
        new_h = new_w / aspect
    else:
        new_w = new_h * aspect
    crop_h = new_h * (window[3] - window[1])
    crop_w = new_w * (window[2] - window[0])
    if crop_w < p.width_scale or crop_h < p.height_scale:
        raise DataError(f"resize_param: the {crop_w:g}×{crop_h:g} crop is smaller than "
                        f"width_scale × height_scale")
    scale = np.array([crop_w / p.width_scale, crop_h / p.height_scale] * 2, dtype=f32)
    return (xyxy * scale).astype(f32)
