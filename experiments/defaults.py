"""The project's default data set and where its pieces live (all relative to the checkout).

``data/fashion50/``: 50 Fashion-MNIST images per class (committed), its split lists
``train.txt``/``test.txt``/``labels.txt`` and silhouette landmarks ``list_landmarks.txt``.
``data/fashion50_lmdb/`` (72×72 images, for the 64×64-crop CPU models) and
``data/fashion50_lmdb_256/`` (256×256, for the 224/227 crops of the paper's models): each
holds ``train``/``test`` LMDBs (colour, landmarks in float_data) and ``mean.binaryproto`` —
what ``models/*/train_val.prototxt`` read. Built by ``tools/prepare_default_data.py`` (or
make_split → convert_imageset → compute_mean with no arguments); not committed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from caffe_compat.formats.errors import DataError

CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot")
DEFAULT_SIZE = 72          # stored side: a 64×64 crop (the CPU models) fits with jitter
DEFAULT_SIZES = (72, 256)  # every size the models/ read; 256 for 224×224 and 227×227 crops
TRAIN_PER_CLASS, TEST_PER_CLASS, SPLIT_SEED = 40, 10, 0


def lmdb_dir(repo: Path, size: int) -> Path:
    """data/fashion50_lmdb for the 72×72 default, data/fashion50_lmdb_<size> otherwise."""
    name = "fashion50_lmdb" if size == DEFAULT_SIZE else f"fashion50_lmdb_{size}"
    return Path(repo) / "data" / name


def existing_sizes(repo: Path) -> list[int]:
    """Sizes of the default databases already built in this checkout."""
    sizes = []
    for p in (Path(repo) / "data").glob("fashion50_lmdb*"):
        suffix = p.name[len("fashion50_lmdb"):]
        if suffix == "":
            sizes.append(DEFAULT_SIZE)
        elif suffix[1:].isdigit() and suffix[0] == "_":
            sizes.append(int(suffix[1:]))
    return sorted(sizes)


@dataclass(frozen=True)
class DefaultPaths:
    repo: Path
    size: int = DEFAULT_SIZE

    @property
    def images(self) -> Path:
        return self.repo / "data" / "fashion50"

    @property
    def train_list(self) -> Path:
        return self.images / "train.txt"

    @property
    def test_list(self) -> Path:
        return self.images / "test.txt"

    @property
    def labels(self) -> Path:
        return self.images / "labels.txt"

    @property
    def landmarks(self) -> Path:
        return self.images / "list_landmarks.txt"

    @property
    def lmdb(self) -> Path:
        return lmdb_dir(self.repo, self.size)

    @property
    def train_db(self) -> Path:
        return self.lmdb / "train"

    @property
    def test_db(self) -> Path:
        return self.lmdb / "test"

    @property
    def mean(self) -> Path:
        return self.lmdb / "mean.binaryproto"


def _check_images(p: DefaultPaths) -> None:
    if not p.images.is_dir():
        raise DataError(f"{p.images}: default images missing (run tools/prepare_fashion_mnist.py)")


def ensure_split(p: DefaultPaths, report=print) -> None:
    """Write the default 40/10 split lists unless they exist."""
    from caffe_compat.data.split import make_split
    _check_images(p)
    if not (p.train_list.is_file() and p.test_list.is_file()):
        make_split(p.images, p.images, TRAIN_PER_CLASS, TEST_PER_CLASS, SPLIT_SEED)
        report(f"wrote {p.train_list}, {p.test_list}, {p.labels}")


def ensure_landmarks(p: DefaultPaths, report=print) -> None:
    """Compute silhouette landmarks for every default image unless the file exists."""
    from caffe_compat.data.landmarks import annotate_images, write_landmarks
    from caffe_compat.data.split import all_images
    _check_images(p)
    if p.landmarks.is_file():
        return
    rel = all_images(p.images)
    write_landmarks(p.landmarks, annotate_images(p.images, rel))
    report(f"wrote {p.landmarks} ({len(rel)} images)")


def build_dbs(p: DefaultPaths, gray: bool = False, backend: str = "lmdb", encoded: bool = False,
              encode_type: str = "", report=print) -> None:
    """(Re)build the default train/test databases at ``p.size`` from the split lists."""
    from caffe_compat.data.convert import convert_imageset
    size = p.size
    ensure_split(p, report)
    ensure_landmarks(p, report)
    p.lmdb.mkdir(parents=True, exist_ok=True)
    for lst, db in ((p.train_list, p.train_db), (p.test_list, p.test_db)):
        r = convert_imageset(os.fspath(p.images) + os.sep, os.fspath(lst), os.fspath(db),
                             gray=gray, backend=backend, resize_height=size, resize_width=size,
                             encoded=encoded, encode_type=encode_type,
                             landmark_file=os.fspath(p.landmarks), overwrite=True)
        channels = 1 if gray else 3
        report(f"wrote {db} ({r.written} records, {channels}×{size}×{size}"
               f"{', encoded' if encoded or encode_type else ''}, landmarks)")


def build_mean(p: DefaultPaths, report=print) -> None:
    """Mean of the default training database (built first when missing)."""
    from caffe_compat.formats.blob_io import write_blobproto
    from caffe_compat.data.convert import compute_mean
    if not p.train_db.exists():
        build_dbs(p, report=report)
    write_blobproto(p.mean, compute_mean(os.fspath(p.train_db)))
    report(f"wrote {p.mean}")
