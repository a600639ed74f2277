"""pycaffe's ``caffe.io``: blob/datum conversion, image loading and the input Transformer."""
from __future__ import annotations

import cv2
import numpy as np

from caffe_compat.formats.blob_io import (array_to_blobproto, array_to_datum, blobproto_to_array,
                                  datum_to_array)

__all__ = ["blobproto_to_array", "array_to_blobproto", "datum_to_array", "array_to_datum",
           "load_image", "resize_image", "oversample", "Transformer"]


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """Load an image as float32 RGB in [0, 1], shape (H, W, 3), or (H, W, 1) when not color."""
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    img = cv2.imread(filename, flag)
    if img is None:
        raise IOError(f"cannot read image '{filename}' (missing or not an image)")
    img = img.astype(np.float32) / 255.0
    if color:
        return img[:, :, ::-1].copy()        # OpenCV gives BGR; pycaffe's loader gives RGB
    return img[:, :, np.newaxis]


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """Resize an (H, W, K) image to ``new_dims`` = (height, width), bilinear by default."""
    h, w = int(new_dims[0]), int(new_dims[1])
    interp = cv2.INTER_NEAREST if interp_order == 0 else cv2.INTER_LINEAR
    out = cv2.resize(im.astype(np.float32), (w, h), interpolation=interp)
    return out.reshape(h, w, -1) if out.ndim == 2 else out


def oversample(images, crop_dims) -> np.ndarray:
    """Ten crops per image: four corners and centre, plus their mirrors (pycaffe's order)."""
    crop_dims = np.array(crop_dims)
    out = []
    for im in images:
        h, w = im.shape[:2]
        ch, cw = crop_dims
        starts = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
                  ((h - ch) // 2, (w - cw) // 2)]
        crops = [im[y:y + ch, x:x + cw] for y, x in starts]
        out.extend(crops + [c[:, ::-1] for c in crops])
    return np.asarray(out, dtype=np.float32)


class Transformer:
    """Turn (H, W, K) RGB [0,1] images into the net's (K, H, W) input, and back.

    Configure per input blob: ``set_transpose``, ``set_channel_swap``, ``set_raw_scale``,
    ``set_mean``, ``set_input_scale``; the order of operations is pycaffe's.
    """

    def __init__(self, inputs: dict):
        self.inputs = {k: tuple(v) for k, v in inputs.items()}
        self.transpose, self.channel_swap, self.raw_scale = {}, {}, {}
        self.mean, self.input_scale = {}, {}

    def _check(self, name: str) -> None:
        if name not in self.inputs:
            raise KeyError(f"'{name}' is not one of the Transformer's inputs "
                           f"({', '.join(self.inputs)})")

    def set_transpose(self, name, order) -> None:
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError("transpose order needs one entry per image dimension")
        self.transpose[name] = order

    def set_channel_swap(self, name, order) -> None:
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError("channel swap needs one entry per input channel")
        self.channel_swap[name] = order

    def set_raw_scale(self, name, scale) -> None:
        self._check(name)
        self.raw_scale[name] = scale

    def set_input_scale(self, name, scale) -> None:
        self._check(name)
        self.input_scale[name] = scale

    def set_mean(self, name, mean) -> None:
        """Mean as (K,) per channel or (K, H, W) per pixel, in the net's channel order."""
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        if mean.ndim == 1:
            if mean.shape[0] != self.inputs[name][1]:
                raise ValueError("mean channels do not match the input's channels")
            mean = mean[:, np.newaxis, np.newaxis]
        elif mean.shape[0] != self.inputs[name][1] or \
                mean.shape[1:] != tuple(self.inputs[name][2:]):
            raise ValueError(f"mean shape {mean.shape} does not match input shape "
                             f"{self.inputs[name][1:]}")
        self.mean[name] = mean

    def preprocess(self, name, data) -> np.ndarray:
        """Resize to the input size, transpose, swap channels, scale, subtract mean, scale."""
        self._check(name)
        caffe_in = np.asarray(data, dtype=np.float32)
        in_dims = self.inputs[name][2:]
        if caffe_in.shape[:2] != tuple(in_dims):
            caffe_in = resize_image(caffe_in, in_dims)
        if name in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[name])
        if name in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[name]), :, :]
        if name in self.raw_scale:
            caffe_in = caffe_in * self.raw_scale[name]
        if name in self.mean:
            caffe_in = caffe_in - self.mean[name]
        if name in self.input_scale:
            caffe_in = caffe_in * self.input_scale[name]
        return np.ascontiguousarray(caffe_in, dtype=np.float32)

    def deprocess(self, name, data) -> np.ndarray:
        """Invert ``preprocess`` (except the resize) for looking at a net input."""
        self._check(name)
        decaf_in = np.array(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            decaf_in = decaf_in / self.input_scale[name]
        if name in self.mean:
            decaf_in = decaf_in + self.mean[name]
        if name in self.raw_scale:
            decaf_in = decaf_in / self.raw_scale[name]
        if name in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[name]))
        return decaf_in
