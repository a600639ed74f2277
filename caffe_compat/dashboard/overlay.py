"""A landmark model's prediction drawn over the uploaded photo.

The net saw the photo resized to the bundle's stored size and centre-cropped to its input;
its heatmaps cover that crop. The picture is the photo (enlarged to at least
``MIN_SIDE`` px so a 28-pixel image is readable), darkened outside the crop, with the
heatmaps' per-pixel maximum over the K landmarks laid over the crop in colour (scaled to
[0, 1], square-rooted so a peak's surroundings show too; opacity growing with the value, so
cold regions keep the photo), and a numbered marker at each
landmark's argmax whose peak reaches half the strongest one's (a landmark the training never
saw visible has a flat, low map).
"""
from __future__ import annotations

import base64

import cv2
import numpy as np

from caffe_compat.data.landmarks import heatmap_argmax, map_to_input

MIN_SIDE, MAX_SIDE = 256, 640
MAX_OPACITY = 0.6
SHOWN_FRACTION = 0.5          # markers for peaks at least this share of the strongest
COLOURS = [(0, 0, 255), (0, 128, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0),
           (255, 0, 0), (255, 0, 255), (128, 0, 255)]


def crop_box(spec: dict) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the net's input inside the stored (resized) image."""
    height, width = (int(v) for v in spec["resize"])
    in_h, in_w = (int(v) for v in spec["input_shape"][2:])
    crop = int(spec.get("crop") or 0)
    if not crop:
        return 0, 0, width, height
    return (width - in_w) // 2, (height - in_h) // 2, in_w, in_h


def landmark_points(maps: np.ndarray, spec: dict, photo_hw, names) -> list[dict]:
    """Per landmark: its name, (x, y) in the photo's pixels (pixel centres at integers) and
    the peak value of its map, from one image's K×H'×W' heatmaps."""
    box_x, box_y, in_w, in_h = crop_box(spec)
    stored_h, stored_w = (int(v) for v in spec["resize"])
    xy = map_to_input(heatmap_argmax(maps[None])[0], maps.shape[1:], (in_h, in_w))
    xy += (box_x, box_y)
    sx, sy = photo_hw[1] / stored_w, photo_hw[0] / stored_h
    points = []
    for k, (x, y) in enumerate(xy):
        points.append({"index": k, "name": names[k] if k < len(names) else str(k),
                       "x": round(float((x + 0.5) * sx - 0.5), 2),
                       "y": round(float((y + 0.5) * sy - 0.5), 2),
                       "peak": float(maps[k].max())})
    strongest = max(p["peak"] for p in points)
    for p in points:
        p["shown"] = bool(strongest > 0 and p["peak"] >= SHOWN_FRACTION * strongest)
    return points


def _canvas(photo: np.ndarray) -> tuple[np.ndarray, float]:
    """The photo at display size (nearest-neighbour when enlarged) and its scale."""
    side = max(photo.shape[:2])
    factor = min(max(side, MIN_SIDE), MAX_SIDE) / side
    size = (max(1, round(photo.shape[1] * factor)), max(1, round(photo.shape[0] * factor)))
    method = cv2.INTER_NEAREST if factor > 1 else cv2.INTER_AREA
    return cv2.resize(photo, size, interpolation=method).astype(np.float32), factor


def overlay_png(photo: np.ndarray, maps: np.ndarray, spec: dict, points: list[dict]) -> bytes:
    """The PNG described in the module docstring, for one BGR photo and its K×H'×W' maps."""
    canvas, factor = _canvas(photo)
    stored_h, stored_w = (int(v) for v in spec["resize"])
    box_x, box_y, in_w, in_h = crop_box(spec)
    fx, fy = photo.shape[1] / stored_w * factor, photo.shape[0] / stored_h * factor
    x0, y0 = round(box_x * fx), round(box_y * fy)
    x1, y1 = round((box_x + in_w) * fx), round((box_y + in_h) * fy)
    shaded = canvas * 0.55
    shaded[y0:y1, x0:x1] = canvas[y0:y1, x0:x1]
    heat = maps.max(axis=0)
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
    heat = np.sqrt(heat)          # the spread around each peak shows, not only its top
    heat = cv2.resize(heat.astype(np.float32), (x1 - x0, y1 - y0),
                      interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (MAX_OPACITY * heat)[..., None]
    shaded[y0:y1, x0:x1] = shaded[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    out = np.clip(shaded, 0, 255).astype(np.uint8)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    for p in points:
        if not p["shown"]:
            continue
        centre = (round((p["x"] + 0.5) * factor - 0.5), round((p["y"] + 0.5) * factor - 0.5))
        colour_k = COLOURS[p["index"] % len(COLOURS)]
        cv2.circle(out, centre, 6, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(out, centre, 4, colour_k, -1, cv2.LINE_AA)
        cv2.putText(out, str(p["index"]), (centre[0] + 7, centre[1] - 5),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 2, cv2.LINE_AA)
        cv2.putText(out, str(p["index"]), (centre[0] + 7, centre[1] - 5),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour_k, 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", out)
    return png.tobytes()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


__all__ = ["crop_box", "landmark_points", "overlay_png", "data_url"]
