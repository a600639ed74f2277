"""Per-class train/test splits of an image folder tree (one sub-folder per class)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from caffe_compat.formats.atomic import write_text
from caffe_compat.formats.errors import DataError
from caffe_compat.data.image_list import write_image_list

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp"}


def all_images(root: str | os.PathLike) -> list[str]:
    """Every image file below ``root``, as sorted '/'-separated relative paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names by index, one per line (a labels.txt)."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DataError(f"{os.fspath(path)}: labels file does not exist") from None
    return [n for n in names if n]


def find_classes(root: str | os.PathLike, labels_file: str | os.PathLike | None = None):
    """Class names in label order and their sorted image paths relative to ``root``.

    The order comes from ``labels_file`` (or ``root/labels.txt`` when present), else from the
    sorted folder names. Folders without images are ignored unless labels.txt names them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    folders = {p.name: sorted(f"{p.name}/{f.name}" for f in p.iterdir()
                              if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
               for p in root.iterdir() if p.is_dir()}
    folders = {k: v for k, v in folders.items() if v}
    if labels_file is None and (root / "labels.txt").is_file():
        labels_file = root / "labels.txt"
    if labels_file is not None:
        names = read_labels(labels_file)
        missing = [n for n in names if n not in folders]
        if missing:
            raise DataError(f"{os.fspath(labels_file)}: no images for class(es) "
                            f"{', '.join(missing)} under {root}")
        extra = sorted(set(folders) - set(names))
        if extra:
            raise DataError(f"{os.fspath(labels_file)}: folder(s) {', '.join(extra)} under "
                            f"{root} are not listed (add them or move them away)")
    else:
        names = sorted(folders)
    if not names:
        raise DataError(f"{root}: no class folders with images")
    return names, {n: folders[n] for n in names}


def split_classes(classes: list[str], files: dict[str, list[str]], train_per_class: int,
                  test_per_class: int, seed: int):
    """Draw train/test (path, label) lists: per class a seeded random subset, no overlap.

    The train list is shuffled as a whole (a Data layer reads in order and never shuffles);
    the test list stays grouped by class.
    """
    short = [f"{c} ({len(files[c])})" for c in classes
             if len(files[c]) < train_per_class + test_per_class]
    if short:
        raise DataError(f"too few images for {train_per_class}+{test_per_class} per class: "
                        f"{', '.join(short)}")
    counts = {c: (train_per_class, test_per_class) for c in classes}
    return split_counts(classes, files, counts, seed)


def split_counts(classes: list[str], files: dict[str, list[str]],
                 counts: dict[str, tuple[int, int]], seed: int):
    """``split_classes`` with its own (train, test) count per class (a stratified split)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        n_train, n_test = counts[name]
        chosen = [files[name][i] for i in rng.permutation(len(files[name]))]
        train += [(p, label) for p in chosen[:n_train]]
        test += [(p, label) for p in sorted(chosen[n_train:n_train + n_test])]
    train = [train[i] for i in rng.permutation(len(train))]
    return train, test


def percent_counts(files: dict[str, list[str]], val_percent: float) -> dict[str, tuple[int, int]]:
    """(train, val) per class holding out ``val_percent`` of each class, rounded, at least one
    image on each side; a class with fewer than two images is an error naming it."""
    if not 0 < val_percent < 100:
        raise DataError(f"--val-percent must be between 0 and 100 (got {val_percent:g})")
    short = [f"{c} ({len(f)})" for c, f in files.items() if len(f) < 2]
    if short:
        raise DataError("a class needs at least 2 images (one to train, one to validate): "
                        + ", ".join(short))
    counts = {}
    for name, found in files.items():
        n_val = min(max(1, round(len(found) * val_percent / 100)), len(found) - 1)
        counts[name] = (len(found) - n_val, n_val)
    return counts


def make_split(root, out_dir=None, train_per_class: int = 40, test_per_class: int = 10,
               seed: int = 0, labels_file=None) -> dict[str, Path]:
    """Write train.txt, test.txt and labels.txt for the class folders under ``root``."""
    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:   # a file in the way, a read-only filesystem
        raise DataError(f"{out}: cannot create the output folder "
                        f"({exc.strerror or exc})") from None
    classes, files = find_classes(root, labels_file)
    train, test = split_classes(classes, files, train_per_class, test_per_class, seed)
    paths = {"train": out / "train.txt", "test": out / "test.txt", "labels": out / "labels.txt"}
    try:
        write_image_list(paths["train"], train)
        write_image_list(paths["test"], test)
        write_text(paths["labels"], "".join(f"{c}\n" for c in classes))
    except OSError as exc:
        raise DataError(f"{out}: cannot write the split lists ({exc.strerror or exc})") from None
    return paths
