"""Contact sheets: rows of labelled thumbnails in one PNG (a data set's classes, a score's
most confident mistakes), drawn with OpenCV so they need no display."""
from __future__ import annotations

import os

import cv2
import numpy as np

from caffe_compat.formats.atomic import atomic_write

TITLE_WIDTH = 150          # the row title's column, in pixels
CAPTION_HEIGHT = 14


def _thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """A BGR ``side``×``side`` tile: the image scaled to fit, centred on grey."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    factor = side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1
                       else cv2.INTER_NEAREST)
    tile = np.full((side, side, 3), 200, np.uint8)
    top, left = (side - size[1]) // 2, (side - size[0]) // 2
    tile[top:top + size[1], left:left + size[0]] = small
    return tile


def _text(canvas: np.ndarray, text: str, x: int, y: int, width: int, scale=0.38) -> None:
    """Put ``text`` at baseline (x, y), shortened with '…' to fit ``width`` pixels."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    while text and cv2.getTextSize(text, font, scale, 1)[0][0] > width:
        text = text[:-2] + "~" if len(text) > 2 else ""
    cv2.putText(canvas, text, (x, y), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def contact_sheet(rows, path: str | os.PathLike, side: int = 72) -> str:
    """Write ``rows`` = [(title, [(BGR image, caption), ...]), ...] as a PNG; returns path.

    Each row is the title, then its thumbnails (``side`` pixels square) with their captions
    underneath; rows may differ in length.
    """
    rows = [(title, list(items)) for title, items in rows]
    columns = max([len(items) for _, items in rows] + [1])
    cell_h = side + CAPTION_HEIGHT + 4
    canvas = np.full((max(1, len(rows)) * cell_h + 4, TITLE_WIDTH + columns * (side + 4), 3),
                     255, np.uint8)
    for r, (title, items) in enumerate(rows):
        top = 2 + r * cell_h
        _text(canvas, title, 4, top + side // 2 + 5, TITLE_WIDTH - 8, 0.5)
        for c, (image, caption) in enumerate(items):
            left = TITLE_WIDTH + c * (side + 4)
            canvas[top:top + side, left:left + side] = _thumbnail(image, side)
            _text(canvas, caption, left, top + side + CAPTION_HEIGHT - 2, side)
    ok, data = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError(f"{path}: OpenCV could not encode the contact sheet")
    with atomic_write(path, "wb") as f:
        f.write(data.tobytes())
    return os.fspath(path)
