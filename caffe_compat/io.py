"""pycaffe's ``caffe.io``: blob/datum conversion, image loading and the input Transformer."""
from __future__ import annotations

import os

import cv2
import numpy as np

from caffe_compat.formats import blob_io
from caffe_compat.formats.blob_io import array_to_blobproto, array_to_datum
from caffe_compat.formats.images import imdecode_checked, imread_checked
from caffe_compat.proto import caffe_pb2

__all__ = ["blobproto_to_array", "array_to_blobproto", "datum_to_array", "array_to_datum",
           "arraylist_to_blobprotovector_str", "arraylist_to_blobprotovecor_str",
           "blobprotovector_str_to_arraylist",
           "load_image", "resize_image", "oversample", "Transformer"]

# skimage's rgb2gray weights (pycaffe loads with skimage.io.imread(as_grey=True))
_GRAY = np.array([0.2125, 0.7154, 0.0721])


def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) reshaped to its legacy 4-D or ``shape.dim`` shape, as
    float64: pycaffe builds it with ``np.array`` over the repeated float field."""
    return blob_io.blobproto_to_array(blob, return_diff).astype(np.float64)


def datum_to_array(datum) -> np.ndarray:
    """A Datum's C x H x W array: uint8 from ``data``, float64 from ``float_data`` (as
    pycaffe's ``np.array(...).astype(float)``)."""
    arr = blob_io.datum_to_array(datum)
    return arr if arr.dtype == np.uint8 else arr.astype(np.float64)


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """Serialize a list of arrays as one BlobProtoVector message."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(np.asarray(a)) for a in arraylist)
    return vec.SerializeToString()


# pycaffe's name for it up to rc3 (a typo fixed in 2016); old scripts still call it
arraylist_to_blobprotovecor_str = arraylist_to_blobprotovector_str


def blobprotovector_str_to_arraylist(data: bytes) -> list:
    """Parse a serialized BlobProtoVector back into a list of arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(b) for b in vec.blobs]


def load_image(filename, color: bool = True) -> np.ndarray:
    """Load an image as float32 in [0, 1]: (H, W, 3) RGB, or (H, W, 1) with ``color=False``.

    ``filename`` is a path or, as skimage's imread takes, an open binary file object
    (open_nsfw hands it a BytesIO of a re-encoded JPEG). As pycaffe: a grayscale file is
    tiled to 3 channels when ``color``, an alpha channel is dropped, 16-bit files scale by
    1/65535, floating-point files keep their values, and a color file read with
    ``color=False`` is converted with skimage's luminance weights.
    """
    img, name = _read_encoded(filename)
    if img is None:
        raise IOError(f"cannot read image '{name}' (missing or not an image)")
    # skimage's img_as_float: integers become float64 times 1/max, floating-point pixels
    # (a float TIFF) keep their values; the grey mix also in float64, as skimage's rgb2gray;
    # pycaffe rounds to float32 once, at the end.
    if np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float64)
    else:
        img = img.astype(np.float64) * (1.0 / (65535.0 if img.dtype == np.uint16 else 255.0))
    if img.ndim == 3:
        img = img[:, :, 2::-1] if img.shape[2] >= 3 else img[:, :, :1]   # BGR(A) -> RGB
        if not color and img.shape[2] == 3:
            img = img @ _GRAY
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
    if color and img.shape[2] == 1:
        img = np.tile(img, (1, 1, 3))
    return np.ascontiguousarray(img, dtype=np.float32)


def _read_encoded(source):
    """(decoded array or None, name for messages) from a path or a binary file object."""
    if hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):      # a text buffer: Python 2 scripts' StringIO habits
            data = data.encode("latin-1")
        name = getattr(source, "name", type(source).__name__)
        if not data:
            return None, name
        return imdecode_checked(bytes(data), cv2.IMREAD_UNCHANGED, f"image '{name}'"), name
    name = os.fspath(source)
    if not os.path.isfile(name):
        raise IOError(f"cannot read image '{name}' (missing or not a file)")
    return imread_checked(name, cv2.IMREAD_UNCHANGED, f"image '{name}'"), name  # size first


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """Resize an (H, W, K) image to ``new_dims`` = (height, width) as pycaffe does.

    One or three channels: scaled to [0, 1], resized by skimage's ``resize(..., order,
    mode='constant')`` rules -- a Gaussian of sigma (factor - 1) / 2 per axis first when
    shrinking (skimage's anti-aliasing), then a spline zoom on pixel areas, clipped to [0, 1]
    -- and scaled back. A constant image stays exactly constant. Other channel counts:
    scipy's plain ``zoom``, as pycaffe. Both run on scipy.ndimage, the code skimage calls.
    """
    from scipy import ndimage
    h, w = int(new_dims[0]), int(new_dims[1])
    im = np.asarray(im, dtype=np.float32) if np.asarray(im).dtype != np.float64 else \
        np.asarray(im)
    if im.shape[-1] not in (1, 3):
        scale = tuple(np.array((h, w), dtype=float) / np.array(im.shape[:2]))
        return ndimage.zoom(im, scale + (1,), order=interp_order).astype(np.float32)
    lo, hi = im.min(), im.max()
    if not hi > lo:
        return np.full((h, w, im.shape[-1]), lo, np.float32)
    std = (im - lo) / (hi - lo)
    factors = np.divide(std.shape, (h, w, std.shape[-1]))
    sigmas = np.maximum(0, (factors - 1) / 2)      # skimage's anti-aliasing when shrinking
    if interp_order == 1:                          # pycaffe's default, without scipy's cost
        out = std.astype(np.float32)
        if np.any(sigmas > 0):
            out = cv2.sepFilter2D(out, -1, _gaussian_taps(sigmas[1]), _gaussian_taps(sigmas[0]),
                                  borderType=cv2.BORDER_CONSTANT).reshape(out.shape)
        out = _linear_zoom(_linear_zoom(out, h, axis=0), w, axis=1)
    else:
        if np.any(factors > 1):
            std = ndimage.gaussian_filter(std, sigmas, cval=0, mode="grid-constant")
        out = ndimage.zoom(std, 1 / factors, order=interp_order, mode="grid-constant", cval=0,
                           grid_mode=True)
    np.clip(out, 0, 1, out=out)
    return (out * (hi - lo) + lo).astype(np.float32)


def _gaussian_taps(sigma: float) -> np.ndarray:
    """scipy.ndimage's Gaussian kernel: radius int(4·sigma + 0.5), normalised to sum 1."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return np.ones(1, np.float32)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _linear_zoom(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """scipy's ``zoom(order=1, grid_mode=True, mode='grid-constant')`` along ``axis``:
    output i samples coordinate (i + 0.5)·n_in/n_out - 0.5 linearly, zero beyond the ends."""
    n_in = x.shape[axis]
    coord = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    left = np.floor(coord).astype(np.intp)
    frac = (coord - left).astype(np.float32)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    padded = np.pad(x, pad)                         # index -1 and n_in read 0
    shape = [1] * x.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return (np.take(padded, left + 1, axis=axis) * (1 - frac)
            + np.take(padded, left + 2, axis=axis) * frac)


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
        mean = np.asarray(mean)     # kept as given: preprocess subtracts it at its precision
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
                lo, hi = mean.min(), mean.max()
                unit = (mean - lo) / (hi - lo) if hi > lo else np.zeros(mean.shape, np.float32)
                mean = resize_image(unit.transpose(1, 2, 0), in_shape[1:]).transpose(2, 0, 1)
                mean = mean * (hi - lo) + lo
        self.mean[name] = mean

    def preprocess(self, name, data) -> np.ndarray:
        """Resize to the input size, transpose, swap channels, scale, subtract mean, scale."""
        self._check(name)
        # One private float32 copy, then pycaffe's in-place steps: each result is rounded
        # to float32 as pycaffe's ``*=``/``-=`` round it (a float64 mean is subtracted at
        # float64 precision). Unlike pycaffe, the caller's array is never modified.
        caffe_in = np.array(data, dtype=np.float32)
        in_dims = self.inputs[name][2:]
        if caffe_in.shape[:2] != tuple(in_dims):
            caffe_in = resize_image(caffe_in, in_dims)
        if name in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[name])
        if name in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[name]), :, :]
        if name in self.raw_scale:
            caffe_in *= self.raw_scale[name]
        if name in self.mean:
            caffe_in -= self.mean[name]
        if name in self.input_scale:
            caffe_in *= self.input_scale[name]
        return np.ascontiguousarray(caffe_in, dtype=np.float32)

    def deprocess(self, name, data) -> np.ndarray:
        """Invert ``preprocess`` (except the resize) for looking at a net input."""
        self._check(name)
        decaf_in = np.array(data).squeeze()       # a copy at the blob's precision
        if not np.issubdtype(decaf_in.dtype, np.floating):
            decaf_in = decaf_in.astype(np.float32)
        if name in self.input_scale:
            decaf_in /= self.input_scale[name]
        if name in self.mean:
            decaf_in += self.mean[name]
        if name in self.raw_scale:
            decaf_in /= self.raw_scale[name]
        if name in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[name]))
        return decaf_in
