"""Reading, resizing and encoding images as Caffe's ``io.cpp`` does (OpenCV, BGR, uint8)."""
from __future__ import annotations

import logging
import os
import re

import cv2
import numpy as np

from caffe_compat.formats.budget import check_bytes
from caffe_compat.formats.c_stderr import c_stderr_lines
from caffe_compat.formats.errors import CaffeCompatError, DataError, with_context
from caffe_compat.formats.image_header import check_encoded_size, jpeg_is_truncated

log = logging.getLogger(__name__)
_WARNED: set[str] = set()     # truncated JPEGs already reported
# libjpeg's warnings (jerror.h, JWRN_*): what it prints on stderr while decoding a damaged file
_LIBJPEG_WARNING = re.compile(r"(Premature end of JPEG file|Corrupt JPEG data|Warning: |Invalid "
                              r"SOS parameters|Inconsistent progression|Application transferred)")


def read_image(path: str, height: int = 0, width: int = 0, is_color: bool = True,
               where: str | None = None, base: str = "") -> np.ndarray:
    """Caffe's ReadImageToCVMat: imread as BGR (or grey), bilinear resize when both sizes > 0.

    Returns H×W×3 or H×W uint8. ``where`` ("list.txt:5") prefixes the error message; a
    relative ``path`` is read from folder ``base`` when given (messages show it as given).
    """
    prefix = f"{where}: " if where else ""
    full = os.path.join(base, path) if base else path
    if not os.path.isfile(full):          # checked first: OpenCV would also print a warning
        raise DataError(f"{prefix}image '{path}' does not exist")
    img = imread_checked(full, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE,
                         f"{prefix}image '{path}'")
    if img is None:
        raise DataError(f"{prefix}image '{path}' could not be decoded (corrupt or not an image)")
    if height > 0 and width > 0:
        img = cv2.resize(img, (width, height))
    return img


def imread_checked(path: str, flag: int, label: str) -> np.ndarray | None:
    """``cv2.imread`` after the file's header has been checked against the memory budget
    (a 0.8 MB PNG may declare 16000×16000 pixels: 1.8 GB decoded); DataError naming
    ``label`` ("list.txt:5: image 'a.png'") instead of OpenCV's raw error. None when OpenCV
    cannot decode it, as imread."""
    try:
        check_bytes(os.path.getsize(path), label, "the file")
        with open(path, "rb") as f:
            data = f.read()
        _check_header(data, label)
    except OSError as exc:
        raise DataError(f"{label} cannot be read ({exc.strerror or exc})") from None
    try:
        if not jpeg_is_truncated(data):
            return cv2.imread(path, flag)
        return _read_truncated_jpeg(path, flag, label)
    except cv2.error as exc:
        raise DataError(f"{label} could not be decoded ({_opencv_reason(exc)})") from None


def _read_truncated_jpeg(path: str, flag: int, label: str) -> np.ndarray | None:
    """imread of a JPEG that ends early, as Caffe reads it (libjpeg decodes the missing part
    grey), with libjpeg's own stderr line turned into one warning naming the file."""
    with c_stderr_lines(_LIBJPEG_WARNING) as said:
        img = cv2.imread(path, flag)
    if img is not None and path not in _WARNED:     # once per file: epochs re-read it
        _WARNED.add(path)
        libjpeg = f" (libjpeg: {said[0]})" if said else ""
        log.warning("%s is a truncated JPEG: it ends before its end-of-image marker, so the "
                    "rest of the picture decodes grey%s", label, libjpeg)
    return img


def imdecode_checked(data: bytes, flag: int, label: str) -> np.ndarray | None:
    """``cv2.imdecode`` of an image file's bytes, checked as ``imread_checked`` checks."""
    _check_header(data, label)
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise DataError(f"{label} could not be decoded ({_opencv_reason(exc)})") from None


def _check_header(data: bytes, label: str) -> None:
    try:
        check_encoded_size(data, unknown_ok=True)
    except CaffeCompatError as exc:
        raise DataError(with_context(str(exc).replace("encoded ", "", 1), label)) from None


def _opencv_reason(exc: Exception) -> str:
    """The end of OpenCV's multi-line message, on one line (where it says what failed)."""
    return " ".join(str(exc).split())[-160:]


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """An OpenCV image (H×W or H×W×C) as planar C×H×W, the Datum layout."""
    if img.ndim == 2:
        return img[np.newaxis]
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def decode_image(data: bytes, force_color: bool = False, force_gray: bool = False) -> np.ndarray:
    """Decode encoded Datum bytes to C×H×W: native channels unless forced (Caffe's rules)."""
    if force_color and force_gray:
        raise DataError("force_color and force_gray cannot both be set")
    flag = (cv2.IMREAD_COLOR if force_color else
            cv2.IMREAD_GRAYSCALE if force_gray else cv2.IMREAD_UNCHANGED)
    check_encoded_size(data)
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error as exc:
        raise DataError("encoded record could not be decoded as an image "
                        f"({_opencv_reason(exc)})") from None
    if img is None:
        raise DataError("encoded record could not be decoded as an image")
    if img.dtype != np.uint8:
        raise DataError(f"encoded record decodes to {img.dtype} pixels; Caffe needs 8-bit images")
    return hwc_to_chw(img)


def file_extension(path: str) -> str:
    """The lower-case text after the last '.', or the whole path when there is none (Caffe)."""
    dot = path.rfind(".")
    return (path[dot + 1:] if dot >= 0 else path).lower()


def can_encode(encode_type: str) -> bool:
    """Whether OpenCV has a writer for ``encode_type`` ("png", "jpg", ...)."""
    if not encode_type.isascii() or not encode_type.isalnum():
        return False
    try:
        return bool(cv2.haveImageWriter("x." + encode_type))
    except cv2.error:
        return False


def encode_image(img: np.ndarray, encode_type: str) -> bytes:
    """cv::imencode of an H×W(×C) image as ``encode_type`` ("png", "jpg", ...)."""
    if not can_encode(encode_type):
        raise DataError(f"OpenCV cannot encode images as '{encode_type}'")
    ok, buf = cv2.imencode("." + encode_type, img)
    if not ok:
        raise DataError(f"OpenCV cannot encode images as '{encode_type}'")
    return buf.tobytes()
