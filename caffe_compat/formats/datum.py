"""Decoding Datum records into C×H×W images, labels and landmarks (Caffe's rules)."""
from __future__ import annotations

import numpy as np

from caffe_compat.formats.errors import DataError
from caffe_compat.formats.images import decode_image


def decode_datum(value: bytes, force_color: bool = False, force_gray: bool = False,
                 where: str = "record"):
    """``(image C×H×W, label, landmarks K×3 or None)`` from a serialized Datum.

    Pixels come from ``data`` (uint8, or image file bytes when ``encoded``), else from
    ``float_data``. Landmarks are the 3·K floats in ``float_data`` when ``data`` holds the
    image, or the floats after the C·H·W pixels of a float Datum.
    """
    from caffe_compat.proto import caffe_pb2
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception:
        raise DataError(f"{where}: not a Datum") from None
    floats = datum.float_data
    extra = None
    try:
        if datum.encoded:
            img = decode_image(datum.data, force_color, force_gray)
            extra = floats
        else:
            shape = (datum.channels, datum.height, datum.width)
            if min(shape) < 0:
                raise DataError(f"negative dimension in shape {'×'.join(map(str, shape))}")
            size = shape[0] * shape[1] * shape[2]
            if len(datum.data):
                if len(datum.data) != size:
                    raise DataError(f"{len(datum.data)} bytes of data for shape "
                                    f"{'×'.join(map(str, shape))}")
                img = np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
                extra = floats
            else:
                if len(floats) < size or size == 0:
                    raise DataError(f"{len(floats)} float_data values for shape "
                                    f"{'×'.join(map(str, shape))}")
                values = np.asarray(floats, dtype=np.float32)
                img = values[:size].reshape(shape)
                extra = values[size:]
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    landmarks = None
    if len(extra):
        if len(extra) % 3:
            raise DataError(f"{where}: {len(extra)} landmark floats, not a multiple of 3")
        landmarks = np.asarray(extra, dtype=np.float32).reshape(-1, 3)
    return img, datum.label, landmarks
