"""Reading and writing Caffe's protobuf files: BlobProto, Datum, binary and text messages.

The array conversions follow pycaffe's `caffe.io` and Caffe's `Blob::FromProto`:
- a BlobProto's shape is the legacy 4-D (num, channels, height, width) when any of those fields
  is present, otherwise `shape.dim`; its values come from `double_data` when present, else `data`;
- a Datum holds planar C×H×W uint8 in `data` (or floats in `float_data`), or an encoded image.
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import math
import os
from pathlib import Path
from typing import Iterable, Sequence, TypeVar, Union

import numpy as np
from google.protobuf import message as _message
from google.protobuf import text_format

from caffe_compat.formats.atomic import write_bytes
from caffe_compat.formats.forks import enclosing_layer, explain_unknown_field
from caffe_compat.proto import caffe_pb2

PathLike = Union[str, "os.PathLike[str]"]
M = TypeVar("M", bound=_message.Message)

_LEGACY_DIMS = ("num", "channels", "height", "width")


class ProtoError(CaffeCompatError):
    """A file exists but does not hold the expected protobuf message."""


class ProtoTextError(ProtoError):
    """A text-format parse error, worded as ``"<file>:<line>:<col>: <reason>"``."""

    def __init__(self, filename: str, line: int | None, column: int | None, reason: str):
        self.filename, self.line, self.column, self.reason = filename, line, column, reason
        loc = filename if line is None else f"{filename}:{line}:{column or 0}"
        super().__init__(f"{loc}: {reason}")


# ---------------------------------------------------------------------------- BlobProto


def blob_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    """The blob's shape: legacy (num, channels, height, width) if any is set, else shape.dim."""
    if any(blob.HasField(name) for name in _LEGACY_DIMS):
        return (blob.num, blob.channels, blob.height, blob.width)
    return tuple(blob.shape.dim)


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The blob's values (or gradients) as an array: float64 from double_*, else float32."""
    doubles = blob.double_diff if return_diff else blob.double_data
    if len(doubles):
        values = np.asarray(doubles, dtype=np.float64)
    else:
        values = np.asarray(blob.diff if return_diff else blob.data, dtype=np.float32)
    shape = blob_shape(blob)
    if any(d < 0 for d in shape):
        raise ProtoError(f"BlobProto has a negative dimension in shape {shape}")
    if values.size != math.prod(shape):
        what = "diff" if return_diff else "data"
        raise ProtoError(f"BlobProto has {values.size} {what} values but shape {shape}")
    return values.reshape(shape)


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """A BlobProto with `shape.dim` = arr.shape and float32 `data` (and `diff`), as pycaffe writes."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob


def _legacy_blobproto(arr: np.ndarray) -> caffe_pb2.BlobProto:
    """A BlobProto with legacy num/channels/height/width (leading 1s added) and no `shape`."""
    arr = np.asarray(arr)
    if arr.ndim > 4:
        raise ValueError(f"a legacy 4-D BlobProto cannot hold a {arr.ndim}-D array")
    blob = caffe_pb2.BlobProto()
    blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - arr.ndim) + arr.shape
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    return blob


def read_blobproto(path: PathLike) -> np.ndarray:
    """The array stored in a binary BlobProto file (e.g. a mean.binaryproto)."""
    try:
        return blobproto_to_array(read_proto(path, caffe_pb2.BlobProto))
    except ProtoError as exc:
        raise _naming(path, exc) from None


def _naming(path: PathLike, exc: ProtoError) -> ProtoError:
    """``exc`` with the file's name in front, unless it already names it."""
    name = os.fspath(path)
    return exc if str(exc).startswith(name) else ProtoError(f"{name}: {exc}")


def write_blobproto(path: PathLike, arr: np.ndarray, legacy_4d: bool = True) -> None:
    """Write `arr` as a binary BlobProto, atomically.

    With `legacy_4d` (the default) the file is laid out as compute_image_mean writes a mean:
    num/channels/height/width (a C×H×W array gets num=1) plus `data`, no `shape`. Otherwise
    the modern `shape.dim` layout of `array_to_blobproto` is used.
    """
    blob = _legacy_blobproto(arr) if legacy_4d else array_to_blobproto(arr)
    write_proto_atomic(path, blob)


def read_blobproto_vector(path: PathLike) -> list[np.ndarray]:
    """The arrays stored in a binary BlobProtoVector file."""
    vec = read_proto(path, caffe_pb2.BlobProtoVector)
    try:
        return [blobproto_to_array(b) for b in vec.blobs]
    except ProtoError as exc:
        raise _naming(path, exc) from None


def write_blobproto_vector(path: PathLike, arrays: Iterable[np.ndarray]) -> None:
    """Write arrays as a binary BlobProtoVector (shape.dim layout), atomically."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arrays)
    write_proto_atomic(path, vec)


# ---------------------------------------------------------------------------- Datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """A Datum's image as C×H×W: uint8 from `data`, float32 from `float_data`, decoded if encoded.

    Encoded datums are decoded like Caffe's default (cv2.IMREAD_UNCHANGED, so a grey PNG gives
    one channel) and transposed from H×W×C to C×H×W.
    """
    if datum.encoded:
        from caffe_compat.formats.errors import DataError
        from caffe_compat.formats.images import decode_image  # lazily: OpenCV only when needed
        try:
            return decode_image(datum.data)
        except DataError as exc:
            raise ProtoError(f"encoded Datum: {exc}") from None
    shape = (datum.channels, datum.height, datum.width)
    size = math.prod(shape)
    if len(datum.data):
        if len(datum.data) != size:
            raise ProtoError(f"Datum has {len(datum.data)} bytes of data for shape {shape}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    if len(datum.float_data) != size:
        raise ProtoError(f"Datum has {len(datum.float_data)} float_data values for shape {shape}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A raw Datum from a C×H×W array: uint8 goes to `data` bytes, anything else to `float_data`."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"a Datum holds a C×H×W array, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


# ---------------------------------------------------------------------------- messages


def _new(message: Union[M, type[M]]) -> M:
    """An empty message of the given class (or the given instance, cleared)."""
    if isinstance(message, type):
        return message()
    message.Clear()
    return message


def read_proto(path: PathLike, message: Union[M, type[M]]) -> M:
    """Parse a binary protobuf file into `message` (a class or an instance) and return it."""
    msg = _new(message)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: no such file") from None
    except OSError as exc:   # a directory, no permission, an I/O error
        raise ProtoError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from None
    try:
        msg.ParseFromString(data)
    except _message.DecodeError as exc:
        name = msg.DESCRIPTOR.full_name
        raise ProtoError(f"{os.fspath(path)}: not a binary {name} ({exc})") from None
    return msg


def write_proto_atomic(path: PathLike, message: _message.Message) -> None:
    """Serialize `message` to `path` via a temporary file in the same folder and os.replace.

    Readers never see a half-written file; the file gets the usual umask-based permissions.
    """
    write_bytes(path, message.SerializeToString())


def _looks_like_path(source: Union[str, bytes, "os.PathLike[str]"]) -> bool:
    """Paths are PathLike objects, or one-line strings that exist or cannot be a text proto."""
    if isinstance(source, os.PathLike):
        return True
    if not isinstance(source, str) or not source or "\n" in source:
        return False
    # Every non-empty text-format message contains `field:` or `field {`.
    return os.path.isfile(source) or not any(c in source for c in ":{")


def read_text_proto(path_or_text: Union[str, bytes, "os.PathLike[str]"],
                    message: Union[M, type[M]], filename: str | None = None) -> M:
    """Parse protobuf text format (a prototxt) from a file path or a string into `message`.

    Caffe's strict rules apply: unknown fields and repeated singular fields are errors. Errors are
    raised as ProtoTextError ``"<file>:<line>:<col>: <reason>"``; `filename` names the source in
    messages (default: the path, or "<string>" for text).
    """
    msg = _new(message)
    if _looks_like_path(path_or_text):
        filename = filename or os.fspath(path_or_text)
        try:
            text = Path(path_or_text).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{filename}: no such file") from None
        except UnicodeDecodeError as exc:
            raise ProtoTextError(filename, None, None, f"not UTF-8 text ({exc})") from None
        except OSError as exc:   # a directory, no permission, an I/O error
            raise ProtoTextError(filename, None, None,
                                 f"cannot read ({exc.strerror or exc})") from None
    else:
        filename = filename or "<string>"
        text = path_or_text.decode("utf-8") if isinstance(path_or_text, bytes) else path_or_text
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        reason = str(exc)
        if line is not None and " : " in reason:  # drop protobuf's own "line:col : " prefix
            reason = reason.split(" : ", 1)[1]
        reason = _explain(reason, text, line, col)
        raise ProtoTextError(filename, line, col, reason) from None
    return msg


def _explain(reason: str, text: str, line: int | None, col: int | None) -> str:
    """Name the layer and say whether a known fork defines an unknown field."""
    unknown = explain_unknown_field(reason)
    if unknown is None:
        return reason
    message, field, origin = unknown
    layer = enclosing_layer(text, line, col) if line is not None else None
    where = f"layer '{layer}': " if layer else ""
    return f"{where}{message} has no field '{field}' ({origin})"


__all__: Sequence[str] = [
    "ProtoError", "ProtoTextError", "blob_shape", "blobproto_to_array", "array_to_blobproto",
    "read_blobproto", "write_blobproto", "read_blobproto_vector", "write_blobproto_vector",
    "datum_to_array", "array_to_datum", "read_proto", "write_proto_atomic", "read_text_proto",
]
