"""The image operations of SSD's augmentation (weiliu89/caffe's ``im_transforms.cpp`` and the
cv::Mat paths of its DataTransformer), on H×W×C uint8 BGR images with OpenCV.

Photometric distortion, zoom-out expansion onto a filled canvas, cropping to a normalised
box, resizing under ``resize_param`` (warp, fit-small-side, fit-large-side-and-pad) and the
``noise_param`` degradations. Random draws come from the numpy generator the caller passes,
in the order the fork makes them.
"""
from __future__ import annotations

import cv2
import numpy as np

from caffe_compat.data.bbox import crop_rect, uniform
from caffe_compat.formats.errors import DataError

f32 = np.float32

_INTERP = {1: cv2.INTER_LINEAR, 2: cv2.INTER_AREA, 3: cv2.INTER_NEAREST, 4: cv2.INTER_CUBIC,
           5: cv2.INTER_LANCZOS4}
_BORDER = {1: cv2.BORDER_CONSTANT, 2: cv2.BORDER_REFLECT_101, 3: cv2.BORDER_REPLICATE}
WARP, FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD = 1, 2, 3


def hwc(img: np.ndarray) -> np.ndarray:
    """OpenCV drops the channel axis of one-channel results; put it back."""
    return img[:, :, None] if img.ndim == 2 else img


def convert_to(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """cv::Mat::convertTo(-1, alpha, beta) of a uint8 image: alpha·x + beta in float32,
    rounded half to even and saturated to 0..255."""
    out = img.astype(f32) * f32(alpha) + f32(beta)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg_round_trip(img: np.ndarray, flag: int) -> np.ndarray:
    """What the fork's encoded records go through after each augmentation that rewrites
    them (EncodeCVMatToDatum with "jpg", OpenCV's default quality 95, then decoding)."""
    ok, buf = cv2.imencode(".jpg", img)
    if not ok:
        raise DataError("OpenCV could not encode an augmented image as JPEG")
    return hwc(cv2.imdecode(buf, flag))


# ------------------------------------------------------------------- distortion


def _hsv_channel(img: np.ndarray, channel: int, alpha: float, beta: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    hsv[:, :, channel] = convert_to(hsv[:, :, channel], alpha, beta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _brightness(img, p, rng):
    if uniform(rng, 0, 1) < p.brightness_prob:
        delta = uniform(rng, -p.brightness_delta, p.brightness_delta)
        if abs(delta) > 0:
            return convert_to(img, 1, delta)
    return img


def _contrast(img, p, rng):
    if uniform(rng, 0, 1) < p.contrast_prob:
        delta = uniform(rng, p.contrast_lower, p.contrast_upper)
        if abs(delta - 1) > 1e-3:
            return convert_to(img, delta, 0)
    return img


def _saturation(img, p, rng):
    # The fork tests |delta - 1| != 1e-3 here (not >), so the HSV round trip always happens.
    if uniform(rng, 0, 1) < p.saturation_prob:
        delta = uniform(rng, p.saturation_lower, p.saturation_upper)
        return _hsv_channel(img, 1, delta, 0)
    return img


def _hue(img, p, rng):
    # OpenCV's 8-bit hue runs 0..179; the fork adds delta with saturation, not wrap-around.
    if uniform(rng, 0, 1) < p.hue_prob:
        delta = uniform(rng, -p.hue_delta, p.hue_delta)
        if abs(delta) > 0:
            return _hsv_channel(img, 0, 1, delta)
    return img


def _channel_order(img, p, rng):
    if uniform(rng, 0, 1) < p.random_order_prob:
        return np.ascontiguousarray(img[:, :, rng.permutation(3)])
    return img


def check_distort(p, channels: int, where: str) -> None:
    """DataError for distort_param settings the fork stops on (its CHECKs)."""
    problems = [(p.brightness_delta < 0, "brightness_delta must be >= 0"),
                (p.hue_delta < 0, "hue_delta must be >= 0"),
                (p.contrast_upper < p.contrast_lower or p.contrast_lower < 0,
                 "needs 0 <= contrast_lower <= contrast_upper"),
                (p.saturation_upper < p.saturation_lower or p.saturation_lower < 0,
                 "needs 0 <= saturation_lower <= saturation_upper"),
                (channels != 3 and (p.saturation_prob > 0 or p.hue_prob > 0
                                    or p.random_order_prob > 0),
                 f"saturation, hue and channel order need 3-channel images, the records "
                 f"have {channels}")]
    for bad, message in problems:
        if bad:
            raise DataError(f"{where}: distort_param: {message}")


def distort(img: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    """ApplyDistort: brightness, then contrast before or after saturation and hue (a coin
    flip), then a random channel order; each step happens with its own probability."""
    if uniform(rng, 0, 1) > 0.5:
        steps = (_brightness, _contrast, _saturation, _hue)
    else:
        steps = (_brightness, _saturation, _hue, _contrast)
    for step in steps + (_channel_order,):
        img = step(img, p, rng)
    return img


# ------------------------------------------------------------------- expand and crop


def expand(img: np.ndarray, ratio: np.float32, fill: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image pasted at a random whole-pixel place on a canvas ``ratio`` times its size,
    filled with ``fill`` (one uint8 per channel), and the canvas as a box in the image's
    normalised coordinates (it reaches below 0 and beyond 1)."""
    h, w, c = img.shape
    big_h, big_w = int(f32(h) * ratio), int(f32(w) * ratio)
    y = f32(np.floor(uniform(rng, 0, big_h - h)))
    x = f32(np.floor(uniform(rng, 0, big_w - w)))
    canvas = np.empty((big_h, big_w, c), dtype=np.uint8)
    canvas[...] = fill
    canvas[int(y):int(y) + h, int(x):int(x) + w] = img
    box = np.array([-x / f32(w), -y / f32(h), (f32(big_w) - x) / f32(w),
                    (f32(big_h) - y) / f32(h)], dtype=f32)
    return canvas, box


def crop(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The pixels of a normalised box (clipped to the image, corners truncated)."""
    x, y, w, h = crop_rect(box, img.shape[0], img.shape[1])
    if w <= 0 or h <= 0:
        raise DataError(f"a sampled crop of {img.shape[1]}×{img.shape[0]} pixels is empty "
                        "(batch_sampler min_scale too small for the image)")
    return np.ascontiguousarray(img[y:y + h, x:x + w])


# ------------------------------------------------------------------------- resize


def new_size(p, height: int, width: int) -> tuple[int, int]:
    """(height, width) an image becomes under resize_param (InferNewSize)."""
    h, w = int(p.height), int(p.width)
    if p.resize_mode == FIT_SMALL_SIZE:
        aspect = f32(width) / f32(height)
        if aspect < f32(w) / f32(h):
            h = int(f32(w) / aspect)
        else:
            w = int(aspect * f32(h))
    return h, w


def check_resize(p, channels: int, where: str) -> None:
    if p.height <= 0 or p.width <= 0:
        raise DataError(f"{where}: resize_param needs height and width > 0")
    if len(p.pad_value) not in (0, 1, channels):
        raise DataError(f"{where}: resize_param: give 1 pad_value or one per channel "
                        f"({channels}), not {len(p.pad_value)}")


def resize(img: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    """ApplyResize: the interpolation drawn uniformly from ``interp_mode`` (bilinear when
    none is listed), then warp, fit-small-side or fit-large-side-and-pad."""
    interp = cv2.INTER_LINEAR
    if len(p.interp_mode):
        interp = _INTERP[p.interp_mode[int(rng.integers(len(p.interp_mode)))]]
    h, w = int(p.height), int(p.width)
    aspect = f32(img.shape[1]) / f32(img.shape[0])
    if p.resize_mode == WARP:
        return hwc(cv2.resize(img, (w, h), interpolation=interp))
    if p.resize_mode == FIT_SMALL_SIZE:
        nh, nw = new_size(p, img.shape[0], img.shape[1])
        return hwc(cv2.resize(img, (nw, nh), interpolation=interp))
    return _fit_and_pad(img, p, aspect, interp)


def _fit_and_pad(img, p, aspect, interp):
    h, w = int(p.height), int(p.width)
    pad = list(p.pad_value) or [0.0]
    pad = (pad * 3)[:3] if len(pad) == 1 else pad + [0.0] * (3 - len(pad))
    if aspect > f32(w) / f32(h):
        small = hwc(cv2.resize(img, (w, int(np.floor(f32(w) / aspect))), interpolation=interp))
        top = (h - small.shape[0]) // 2
        borders = (top, h - small.shape[0] - top, 0, 0)
    else:
        small = hwc(cv2.resize(img, (int(np.floor(aspect * f32(h))), h), interpolation=interp))
        left = (w - small.shape[1]) // 2
        borders = (0, 0, left, w - small.shape[1] - left)
    return hwc(cv2.copyMakeBorder(small, *borders, _BORDER[p.pad_mode], value=pad))


# -------------------------------------------------------------------------- noise


def check_noise(p, where: str) -> None:
    """The noise_param options the fork's pipeline cannot carry are refused."""
    if p.convert_to_lab:
        raise DataError(f"{where}: noise_param.convert_to_lab makes float images, which the "
                        "fork's transformer refuses (it needs 8-bit pixels)")
    if p.saltpepper and not len(p.saltpepper_param.value):
        raise DataError(f"{where}: noise_param.saltpepper needs saltpepper_param.value")


def noise(img: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    """ApplyNoise, every option that is set, in the fork's order (``prob`` is not read: the
    fork applies noise_param to every image)."""
    if p.decolorize:
        img = hwc(cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR))
    if p.gauss_blur:
        img = hwc(cv2.GaussianBlur(img, (7, 7), 1.5))
    if p.hist_eq:
        img = _on_luma(img, cv2.equalizeHist)
    if p.clahe:
        img = _on_luma(img, cv2.createCLAHE(clipLimit=4).apply)
    if p.jpeg > 0:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(p.jpeg)])
        img = hwc(cv2.imdecode(buf, cv2.IMREAD_COLOR))
    if p.erode:
        img = hwc(cv2.erode(img, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))))
    if p.posterize:
        img = img // 64 * 64 + 32
    if p.inverse:
        img = 255 - img
    if p.saltpepper:
        img = _salt_pepper(img, p.saltpepper_param, rng)
    if p.convert_to_hsv:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    return img


def _on_luma(img, op):
    if img.shape[2] == 1:
        return hwc(op(img[:, :, 0]))
    ycrcb = cv2.cvtColor(img, cv2.COLOR_BGR2YCrCb)
    ycrcb[:, :, 0] = op(np.ascontiguousarray(ycrcb[:, :, 0]))
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR)


def _salt_pepper(img, sp, rng):
    values = np.array(list(sp.value) * (img.shape[2] if len(sp.value) == 1 else 1))
    out = img.copy()
    count = int(np.floor(f32(sp.fraction) * img.shape[1] * img.shape[0]))
    for _ in range(count):
        x, y = int(rng.integers(img.shape[1])), int(rng.integers(img.shape[0]))
        out[y, x] = values.astype(np.uint8)
    return out
