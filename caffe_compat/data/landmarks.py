"""Clothing landmarks: DeepFashion's file format, geometric transforms, heatmaps, silhouettes.

Eight landmarks, in DeepFashion's order (left = image left for the silhouette tool):
    0 left collar   1 right collar   2 left sleeve      3 right sleeve
    4 left waist    5 right waist    6 left hem         7 right hem
Inside the project a set of landmarks is a K×3 float32 array of rows ``(x, y, visible)`` in
pixel coordinates of the image it belongs to (x = column, y = row, pixel centres at integers),
visible 1 or 0. Databases store it flattened in ``Datum.float_data`` (3·K floats after the
pixels, which Caffe itself ignores because ``data`` holds the image).

DeepFashion's ``list_landmarks.txt``: a count line, a header line, then per image
``image_name clothes_type variation_type`` followed by ``visibility x y`` per landmark, where
visibility 0 = visible, 1 = occluded, 2 = cut off. Upper-body lines (clothes_type 1) carry 6
landmarks (collar, sleeve, hem), lower-body (2) carry 4 (waist, hem), full-body (3) all 8.
Only DeepFashion-visible (0) landmarks count as visible here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from caffe_compat.formats.atomic import atomic_write
from caffe_compat.formats.errors import DataError

NAMES = ("left_collar", "right_collar", "left_sleeve", "right_sleeve",
         "left_waistline", "right_waistline", "left_hem", "right_hem")
NUM_LANDMARKS = len(NAMES)
# Which of the 8 slots the landmarks of a short DeepFashion line fill, by clothes_type.
_SLOTS = {1: (0, 1, 2, 3, 6, 7), 2: (4, 5, 6, 7), 3: tuple(range(8))}


def landmark_names(count: int) -> list[str]:
    """Names of ``count`` landmarks: DeepFashion's eight when they fit, else their numbers."""
    return list(NAMES[:count]) if count <= NUM_LANDMARKS else [str(i) for i in range(count)]


# ---------------------------------------------------------------------------- file format


def read_landmarks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``image_name → 8×3 (x, y, visible)`` from a DeepFashion list_landmarks.txt."""
    name = os.fspath(path)
    try:
        lines = Path(name).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{name}: landmark file does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise DataError(f"{name}: landmark file is not a text file") from None
    result: dict[str, np.ndarray] = {}
    counted = bool(lines) and lines[0].strip().isdigit()   # count line, then a header line
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or (counted and number <= 2) or fields[0] == "image_name":
            continue
        where = f"{name}:{number}"
        if len(fields) < 6 or (len(fields) - 3) % 3:
            raise DataError(f"{where}: expected 'image_name clothes_type variation_type' and "
                            f"'visibility x y' triples, got {len(fields)} fields")
        try:
            ctype = int(fields[1])
            values = np.asarray([float(v) for v in fields[3:]], dtype=np.float32).reshape(-1, 3)
        except ValueError:
            raise DataError(f"{where}: landmark fields must be numbers") from None
        result[fields[0]] = _to_slots(values, ctype, where)
    return result


def _to_slots(values: np.ndarray, ctype: int, where: str) -> np.ndarray:
    """DeepFashion (visibility, x, y) rows → our 8×3 (x, y, visible) array."""
    k = len(values)
    if k == NUM_LANDMARKS:
        slots = tuple(range(8))
    elif ctype in _SLOTS and len(_SLOTS[ctype]) == k:
        slots = _SLOTS[ctype]
    else:
        raise DataError(f"{where}: {k} landmarks do not fit clothes_type {ctype} "
                        "(1: 6 upper-body, 2: 4 lower-body, 3 or any: 8)")
    out = np.zeros((NUM_LANDMARKS, 3), dtype=np.float32)
    for slot, (vis, x, y) in zip(slots, values):
        out[slot] = (x, y, 1.0 if vis == 0 else 0.0)
    return out


def write_landmarks(path: str | os.PathLike, items) -> None:
    """Write ``(image_name, 8×3 array)`` pairs as a DeepFashion full-body landmark file.

    Coordinates are rounded to integers as in DeepFashion; invisible landmarks get
    visibility 1. Written atomically.
    """
    items = list(items)
    header = ["image_name", "clothes_type", "variation_type"]
    for i in range(1, NUM_LANDMARKS + 1):
        header += [f"landmark_visibility_{i}", f"landmark_location_x_{i}",
                   f"landmark_location_y_{i}"]
    with atomic_write(path, "w") as f:
        f.write(f"{len(items)}\n{' '.join(header)}\n")
        for image, lm in items:
            fields = [image, "3", "1"]
            for x, y, v in np.asarray(lm, dtype=np.float64):
                fields += ["0" if v > 0 else "1", str(int(round(x))), str(int(round(y)))]
            f.write(" ".join(fields) + "\n")


# ---------------------------------------------------------------------------- geometry


def mirror_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Flip K×3 landmarks horizontally in an image ``width`` wide and swap left/right pairs."""
    out = np.array(landmarks, dtype=np.float32, copy=True)
    out[:, 0] = (width - 1) - out[:, 0]
    k = len(out) - len(out) % 2
    swapped = out[:k].reshape(-1, 2, 3)[:, ::-1].reshape(-1, 3)
    out[:k] = swapped
    return out


def resize_landmarks(landmarks: np.ndarray, src_hw, dst_hw) -> np.ndarray:
    """Scale K×3 landmarks from an image of size ``src_hw`` to ``dst_hw`` (pixel centres map
    as in cv::resize: x' = (x + 0.5)·W'/W − 0.5)."""
    out = np.array(landmarks, dtype=np.float32, copy=True)
    (sh, sw), (dh, dw) = src_hw, dst_hw
    out[:, 0] = (out[:, 0] + 0.5) * (dw / sw) - 0.5
    out[:, 1] = (out[:, 1] + 0.5) * (dh / sh) - 0.5
    return out


def render_heatmaps(landmarks, height: int, width: int, sigma: float = 0.0, scale_x: float = 1.0,
                    scale_y: float = 1.0):
    """Gaussian target maps (N, K, H, W) for landmarks (N, K, 3) as a torch tensor.

    ``exp(-((u - x)² + (v - y)²) / (2σ²))`` with peak 1 at the landmark; invisible landmarks
    give all-zero maps. Coordinates are first mapped from the image to the map with
    ``x·s + (s − 1)/2`` (pixel centres), s = scale_x or scale_y. σ = 0 means max(H, W)/32.
    """
    import torch
    lm = torch.as_tensor(landmarks, dtype=torch.float32)
    if sigma <= 0:
        sigma = max(height, width) / 32.0
    x = lm[..., 0] * scale_x + (scale_x - 1) / 2
    y = lm[..., 1] * scale_y + (scale_y - 1) / 2
    vis = (lm[..., 2] > 0).to(torch.float32)
    u = torch.arange(width, dtype=torch.float32, device=lm.device)
    v = torch.arange(height, dtype=torch.float32, device=lm.device)
    gx = torch.exp(-(u - x[..., None]) ** 2 / (2 * sigma ** 2))   # (N, K, W)
    gy = torch.exp(-(v - y[..., None]) ** 2 / (2 * sigma ** 2))   # (N, K, H)
    return gy[..., :, None] * gx[..., None, :] * vis[..., None, None]


# ---------------------------------------------------------------------------- silhouettes


def heatmap_argmax(maps: np.ndarray) -> np.ndarray:
    """(N, K, H, W) maps → (N, K, 2) float (x, y) of each map's maximum (first one on ties)."""
    maps = np.asarray(maps)
    n, k, h, w = maps.shape
    flat = maps.reshape(n, k, h * w).argmax(axis=2)
    return np.stack([flat % w, flat // w], axis=2).astype(np.float32)


def map_to_input(xy: np.ndarray, map_hw, input_hw) -> np.ndarray:
    """Map-pixel (x, y) → input pixels, between pixel centres (x' = (x + 0.5)·W/W' − 0.5)."""
    (mh, mw), (ih, iw) = map_hw, input_hw
    out = np.array(xy, dtype=np.float32, copy=True)
    out[..., 0] = (out[..., 0] + 0.5) * (iw / mw) - 0.5
    out[..., 1] = (out[..., 1] + 0.5) * (ih / mh) - 0.5
    return out


def silhouette_mask(img: np.ndarray) -> np.ndarray | None:
    """The filled largest foreground region of a product photo on a plain background.

    ``img`` is H×W grey or H×W×3 BGR uint8. The background level is the median of the
    border pixels; Otsu's threshold on the distance from it separates the object. Returns
    an H×W bool mask, or None when no foreground is found.
    """
    import cv2
    grey = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    diff = cv2.absdiff(grey, np.full_like(grey, int(np.median(border))))
    if diff.max() == 0:
        return None
    _, fg = cv2.threshold(diff, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    mask = np.zeros_like(fg)
    cv2.drawContours(mask, [largest], -1, 255, thickness=cv2.FILLED)
    return mask > 0


def _extreme(xs: np.ndarray, ys: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """The point with the smallest score; ties resolved by the middle one (sorted by x, y)."""
    tied = np.flatnonzero(score == score.min())
    order = tied[np.lexsort((ys[tied], xs[tied]))]
    i = order[(len(order) - 1) // 2]
    return float(xs[i]), float(ys[i])


def silhouette_landmarks(img: np.ndarray) -> np.ndarray:
    """Eight landmarks from the silhouette's extreme points (8×3, all invisible if none).

    collar = top-left / top-right corners (min x+y, min −x+y), sleeves = leftmost /
    rightmost points, waist = the silhouette's left and right edge on the middle row of its
    bounding box, hem = bottom-left / bottom-right corners (max y−x, max x+y). Ties are
    broken by taking the middle of the tied points.
    """
    out = np.zeros((NUM_LANDMARKS, 3), dtype=np.float32)
    mask = silhouette_mask(img)
    if mask is None:
        return out
    ys, xs = np.nonzero(mask)
    ys, xs = ys.astype(np.int64), xs.astype(np.int64)
    mid = (ys.min() + ys.max()) // 2
    row = xs[ys == mid]
    points = [
        _extreme(xs, ys, xs + ys),            # left collar: top-left
        _extreme(xs, ys, ys - xs),            # right collar: top-right
        _extreme(xs, ys, xs),                 # left sleeve: leftmost
        _extreme(xs, ys, -xs),                # right sleeve: rightmost
        (float(row.min()), float(mid)),       # left waist
        (float(row.max()), float(mid)),       # right waist
        _extreme(xs, ys, xs - ys),            # left hem: bottom-left
        _extreme(xs, ys, -(xs + ys)),         # right hem: bottom-right
    ]
    out[:, :2] = points
    out[:, 2] = 1.0
    return out


def draw_landmarks(img: np.ndarray, landmarks: np.ndarray, zoom: int = 8) -> np.ndarray:
    """A BGR picture of the image enlarged ``zoom``× with the visible landmarks drawn."""
    import cv2
    big = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    if big.ndim == 2:
        big = cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)
    colours = [(0, 0, 255), (0, 128, 255), (0, 255, 255), (0, 255, 0),
               (255, 255, 0), (255, 0, 0), (255, 0, 255), (128, 0, 255)]
    for i, (x, y, v) in enumerate(landmarks):
        if v > 0:
            centre = (int(round((x + 0.5) * zoom)), int(round((y + 0.5) * zoom)))
            cv2.circle(big, centre, max(2, zoom // 2), colours[i % 8], -1)
            cv2.putText(big, str(i), (centre[0] + 3, centre[1] - 3), cv2.FONT_HERSHEY_SIMPLEX,
                        0.3 + zoom / 40, colours[i % 8], 1)
    return big


def annotate_images(root: str | os.PathLike, rel_paths, overlay_dir=None, zoom: int = 8,
                    show_progress: bool | None = None) -> list[tuple[str, np.ndarray]]:
    """Silhouette landmarks for each image ``root/rel`` (with optional overlay PNGs)."""
    import cv2

    from caffe_compat.data.convert import progress
    from caffe_compat.formats.images import read_image
    results = []
    for rel in progress(list(rel_paths), desc="landmarks", enable=show_progress):
        img = read_image(os.path.join(os.fspath(root), rel), is_color=True)
        lm = silhouette_landmarks(img)
        results.append((rel, lm))
        if overlay_dir is not None:
            target = Path(overlay_dir) / rel
            target = target.with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(os.fspath(target), draw_landmarks(img, lm, zoom))
    return results
