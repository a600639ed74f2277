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
