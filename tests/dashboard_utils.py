"""Shared by the dashboard tests: a tiny image folder, an app on a temporary workdir."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square")


def draw(kind: str, seed: int, size: int = 40) -> np.ndarray:
    """A BGR image of a white circle or square on noise (two classes a net learns at once)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    centre, radius = size // 2 + int(rng.integers(-3, 4)), size // 4 + int(rng.integers(0, 3))
    if kind == "circle":
        cv2.circle(image, (centre, centre), radius, (255, 255, 255), -1)
    else:
        cv2.rectangle(image, (centre - radius, centre - radius), (centre + radius,
                      centre + radius), (255, 255, 255), -1)
    return image


def image_folder(root: Path, name: str = "shapes", per_class: int = 10) -> Path:
    """``root/name/<class>/<n>.png``: ``per_class`` drawings of each class."""
    folder = root / name
    for label, kind in enumerate(CLASSES):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(str(folder / kind / f"{i}.png"), draw(kind, 100 * label + i))
    return folder


def png_bytes(kind: str = "circle", seed: int = 7) -> bytes:
    return cv2.imencode(".png", draw(kind, seed))[1].tobytes()

