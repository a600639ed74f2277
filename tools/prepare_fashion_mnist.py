#!/usr/bin/env python3
"""Write Fashion-MNIST images as PNG class folders (or LMDBs) from the IDX files.

Fashion-MNIST (Zalando Research, MIT licence) ships as four IDX files; the Debian package
`dataset-fashion-mnist` installs them under /usr/share/datasets/fashion-mnist
(`apt-get install dataset-fashion-mnist`). Images are 28×28 grey; labels 0..9 are
tshirt_top trouser pullover dress coat sandal shirt sneaker bag ankle_boot.

Examples:
  python tools/prepare_fashion_mnist.py
      the embedded default: the first 50 training images of each class, in index order,
      as data/fashion50/<class>/<index>.png plus data/fashion50/labels.txt
  python tools/prepare_fashion_mnist.py --per-class 500 --out data/fashion500
  python tools/prepare_fashion_mnist.py --full --out data/fashion_full
      all 60,000/10,000 images as OUT/train/<class>/… and OUT/test/<class>/… with
      OUT/train.txt, OUT/test.txt (Caffe list format, relative to OUT) and OUT/labels.txt
  python tools/prepare_fashion_mnist.py --lmdb data/fashion_full_lmdb [--color] [--resize 32]
      the full set straight into OUT/train and OUT/test LMDBs (keys and Datums as
      convert_imageset would write them from the --full folders)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.common import fail, repo_root, shown  # noqa: E402
from caffe_compat.data.convert import progress  # noqa: E402
from experiments.defaults import CLASSES  # noqa: E402
from experiments.fashion_mnist import load, rel_name  # noqa: E402
from caffe_compat.formats.errors import DataError  # noqa: E402

DEFAULT_IDX = "/usr/share/datasets/fashion-mnist"
def write_pngs(images, labels, out: Path, indices, prefix: str = "") -> list[tuple[str, int]]:
    import cv2
    written = []
    for i in progress(indices, desc=f"{prefix or 'images'}"):
        rel = rel_name(int(i), int(labels[i]), prefix)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(os.fspath(target), images[i]):
            raise DataError(f"{target}: could not write PNG")
        written.append((rel, int(labels[i])))
    return written


def write_labels(out: Path) -> None:
    (out / "labels.txt").write_text("".join(f"{c}\n" for c in CLASSES), encoding="utf-8")


def first_per_class(labels: np.ndarray, count: int) -> list[int]:
    chosen = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)[:count]
        if len(idx) < count:
            raise DataError(f"class {CLASSES[c]} has only {len(idx)} training images")
        chosen += idx.tolist()
    return sorted(chosen)


def write_lmdbs(idx_dir: Path, out: Path, color: bool, resize: int, backend: str) -> None:
    import cv2

    from caffe_compat.data.db import DBWriter
    from caffe_compat.proto import caffe_pb2
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images, labels = load(idx_dir, split)
        with DBWriter(out / split, backend) as db:
            for n, (img, label) in enumerate(progress(zip(images, labels), total=len(images),
                                                      desc=split)):
                if resize:
                    img = cv2.resize(img, (resize, resize))
                chw = np.repeat(img[None], 3, axis=0) if color else img[None]
                datum = caffe_pb2.Datum(channels=chw.shape[0], height=chw.shape[1],
                                        width=chw.shape[2], data=chw.tobytes(), label=int(label),
                                        encoded=False)
                db.put(f"{n:08d}_{rel_name(n, int(label), split + '/')}",
                       datum.SerializeToString())
        print(f"wrote {shown(out / split)} ({len(images)} records)")


def main(argv: list[str] | None = None) -> int:
    repo = repo_root(__file__)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idx-dir", default=DEFAULT_IDX,
                    help=f"folder with the (gzipped) IDX files (default {DEFAULT_IDX})")
    ap.add_argument("--out", default=None,
                    help="output folder (default data/fashion50 in the checkout)")
    ap.add_argument("--per-class", type=int, default=50,
                    help="first N training images of each class, in index order (default 50)")
    ap.add_argument("--full", action="store_true",
                    help="write all 60,000 train and 10,000 test images as folders + lists")
    ap.add_argument("--lmdb", metavar="DIR", default=None,
                    help="write the full set to DIR/train and DIR/test LMDBs instead of PNGs")
    ap.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                    help="database backend for --lmdb (default lmdb)")
    ap.add_argument("--color", action="store_true",
                    help="--lmdb: 3-channel records (as convert_imageset reads grey PNGs)")
    ap.add_argument("--resize", type=int, default=0,
                    help="--lmdb: resize to N×N (bilinear, like --resize_height/width)")
    args = ap.parse_args(argv)
    idx_dir = Path(args.idx_dir)
    try:
        if args.lmdb:
            write_lmdbs(idx_dir, Path(args.lmdb), args.color, args.resize, args.backend)
            return 0
        out = Path(args.out) if args.out else repo / "data" / "fashion50"
        if args.full:
            for split in ("train", "test"):
                images, labels = load(idx_dir, split)
                rows = write_pngs(images, labels, out, range(len(images)), split + "/")
                from caffe_compat.data.image_list import write_image_list
                write_image_list(out / f"{split}.txt", rows)
            write_labels(out)
            print(f"wrote {shown(out)}/train, test, train.txt, test.txt, labels.txt")
            return 0
        images, labels = load(idx_dir, "train")
        rows = write_pngs(images, labels, out, first_per_class(labels, args.per_class))
        write_labels(out)
        print(f"wrote {len(rows)} images ({args.per_class} per class) and labels.txt to "
              f"{shown(out)}")
        return 0
    except DataError as exc:
        return fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
