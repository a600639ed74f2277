"""pycaffe's ``caffe.io``: blob/datum conversion, image loading and the input Transformer."""
from __future__ import annotations

import os

import cv2
import numpy as np

from caffe_compat.formats.blob_io import (array_to_blobproto, array_to_datum, blobproto_to_array,
                                  datum_to_array)
from caffe_compat.formats.images import imread_checked
from caffe_compat.proto import caffe_pb2

__all__ = ["blobproto_to_array", "array_to_blobproto", "datum_to_array", "array_to_datum",
           "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist",
           "load_image", "resize_image", "oversample", "Transformer"]

# skimage's rgb2gray weights (pycaffe loads with skimage.io.imread(as_grey=True))
_GRAY = np.array([0.2125, 0.7154, 0.0721], np.float32)


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """Serialize a list of arrays as one BlobProtoVector message."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(np.asarray(a)) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list:
    """Parse a serialized BlobProtoVector back into a list of arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(b) for b in vec.blobs]


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """Load an image as float32 in [0, 1]: (H, W, 3) RGB, or (H, W, 1) with ``color=False``.

    As pycaffe: a grayscale file is tiled to 3 channels when ``color``, an alpha channel is
    dropped, 16-bit files scale by 1/65535, and a color file read with ``color=False`` is
    converted with skimage's luminance weights.
    """
    if not os.path.isfile(filename):
        raise IOError(f"cannot read image '{filename}' (missing or not a file)")
    img = imread_checked(filename, cv2.IMREAD_UNCHANGED, f"image '{filename}'")  # size first
    if img is None:
        raise IOError(f"cannot read image '{filename}' (missing or not an image)")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    img = img.astype(np.float32) / scale
    if img.ndim == 3:
        img = img[:, :, 2::-1] if img.shape[2] >= 3 else img[:, :, :1]   # BGR(A) -> RGB
        if not color and img.shape[2] == 3:
            img = img @ _GRAY
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
    if color and img.shape[2] == 1:
        img = np.tile(img, (1, 1, 3))
    return np.ascontiguousarray(img, dtype=np.float32)


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """Resize an (H, W, K) image to ``new_dims`` = (height, width); a constant image stays
    constant exactly (pycaffe's special case). Interpolation is OpenCV's (nearest for
    order 0, bilinear otherwise); pycaffe's skimage resize differs at sub-pixel level."""
    h, w = int(new_dims[0]), int(new_dims[1])
    im = np.asarray(im, dtype=np.float32)
    lo, hi = (float(im.min()), float(im.max())) if im.size else (0.0, 0.0)
    if im.size and lo == hi:
        return np.full((h, w, im.shape[-1]), lo, np.float32)
    interp = cv2.INTER_NEAREST if interp_order == 0 else cv2.INTER_LINEAR
    channels = [cv2.resize(np.ascontiguousarray(im[:, :, i:i + 512]), (w, h),
                           interpolation=interp).reshape(h, w, -1)
                for i in range(0, im.shape[-1], 512)]            # OpenCV: <= 512 channels
    return np.concatenate(channels, axis=2).astype(np.float32)


def oversample(images, crop_dims) -> np.ndarray:
    """Ten crops per image: the four corners and the centre, then the same five mirrored
    (pycaffe's order; the centre crop starts at int(centre - crop / 2))."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    center = im_shape[:2] / 2.0
    boxes = [(i, j, i + crop_dims[0], j + crop_dims[1])
             for i in (0, im_shape[0] - crop_dims[0]) for j in (0, im_shape[1] - crop_dims[1])]
    boxes.append(tuple(np.concatenate([center - crop_dims / 2.0,
                                       center + crop_dims / 2.0]).astype(int)))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), np.float32)
    ix = 0
    for im in images:
        for mirror in (False, True):
            for y0, x0, y1, x1 in boxes:
                crop = im[y0:y1, x0:x1, :]
                crops[ix] = crop[:, ::-1, :] if mirror else crop
                ix += 1
    return crops


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
        """Mean as (K,) per channel, or (K, H, W) / (H, W) per pixel. A per-pixel mean of
        another size is resized to the input's (pycaffe's rule: a 3x256x256 ImageNet
        mean serves a 227x227 input), keeping its value range."""
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        in_shape = tuple(self.inputs[name][1:])
        if mean.ndim == 1:
            if mean.shape[0] != in_shape[0]:
                raise ValueError(f"mean has {mean.shape[0]} channels, input '{name}' has "
                                 f"{in_shape[0]}")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if mean.ndim == 2:
                mean = mean[np.newaxis]
            if mean.ndim != 3:
                raise ValueError(f"mean shape {mean.shape} invalid: give (K,), (H, W) or "
                                 "(K, H, W)")
            if mean.shape != in_shape:
                lo, hi = float(mean.min()), float(mean.max())
                unit = (mean - lo) / (hi - lo) if hi > lo else np.zeros_like(mean)
                mean = resize_image(unit.transpose(1, 2, 0), in_shape[1:]).transpose(2, 0, 1)
                mean = mean * (hi - lo) + lo
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
