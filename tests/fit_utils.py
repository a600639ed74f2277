"""Shared pieces of the dataset / fit / bundle / score tests: a small photo folder cut from
data/fashion50, and running ``caffe`` subcommands in-process."""
from __future__ import annotations

import shutil
from pathlib import Path

from caffe_compat.commands import caffe_main

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "data" / "fashion50"


def photo_folder(dest: Path, classes=("bag", "sandal", "trouser"), per_class: int = 8,
                 start: int = 0) -> Path:
    """``dest/<class>/*.png``: ``per_class`` images of each class (from image ``start`` on)."""
    for name in classes:
        (dest / name).mkdir(parents=True, exist_ok=True)
        for image in sorted((FASHION / name).glob("*.png"))[start:start + per_class]:
            shutil.copy(image, dest / name / image.name)
    return dest


def caffe(*argv) -> int:
    return caffe_main.main([str(a) for a in argv])


SHAPE_COLOURS = {"circle": (40, 40, 220), "square": (40, 200, 40), "triangle": (220, 60, 40)}


def shapes_folder(dest: Path, per_class: int, seed: int) -> Path:
    """``dest/<shape>/*.jpg``: circles, squares and triangles, each shape in its own colour
    (BGR above) on a light grey background, of random size and place on photos of 128-256
    pixels a side (not square: the data set squashes them to its stored size)."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    for shape, colour in SHAPE_COLOURS.items():
        (dest / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(128, 257, 2))
            image = np.full((height, width, 3), 245, np.uint8)
            radius = rng.uniform(0.18, 0.38) * min(height, width)
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            if shape == "circle":
                cv2.circle(image, (int(cx), int(cy)), int(radius), colour, -1, cv2.LINE_AA)
            else:
                corners = 4 if shape == "square" else 3
                angles = 2 * np.pi * np.arange(corners) / corners
                points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
                cv2.fillPoly(image, [points.astype(np.int32)], colour, cv2.LINE_AA)
            cv2.imwrite(str(dest / shape / f"{shape}_{i:03d}.jpg"), image)
    return dest
