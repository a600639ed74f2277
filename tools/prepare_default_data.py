#!/usr/bin/env python3
"""Build everything the default models read, from the embedded data/fashion50 images.

Writes, in this checkout:
  data/fashion50/train.txt, test.txt, labels.txt   the 40/10 per-class split (--seed)
  data/fashion50/list_landmarks.txt                silhouette landmarks (kept if present;
                                                   --relabel recomputes them)
  data/fashion50_lmdb/{train,test}                 colour LMDBs, 72×72, 8 landmarks per record
  data/fashion50_lmdb/mean.binaryproto             their training set's mean image
  data/fashion50_lmdb_256/...                      the same at 256×256
These are the paths models/*/train_val.prototxt use: 72×72 leaves room for the 64×64 random
crops of models/*_64, 256×256 for the 224×224 (VGG16) and 227×227 (AlexNet) crops. --size
picks other sizes (N goes to data/fashion50_lmdb_N). The same result comes from
  python tools/make_split.py && python tools/convert_imageset.py && python tools/compute_mean.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.common import fail, repo_root, say  # noqa: E402
from caffe_compat.formats.errors import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from experiments import defaults
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=list(defaults.DEFAULT_SIZES),
                    help="side(s) of the stored images (default: "
                         f"{' '.join(map(str, defaults.DEFAULT_SIZES))})")
    ap.add_argument("--seed", type=int, default=defaults.SPLIT_SEED,
                    help=f"seed of the 40/10 split (default {defaults.SPLIT_SEED})")
    ap.add_argument("--gray", action="store_true", help="1-channel records (default colour)")
    ap.add_argument("--relabel", action="store_true",
                    help="recompute data/fashion50/list_landmarks.txt")
    args = ap.parse_args(argv)
    if min(args.size) <= 0:
        return fail("--size must be positive")
    from caffe_compat.data.split import make_split
    paths = defaults.DefaultPaths(repo_root(__file__))
    report = say
    try:
        defaults._check_images(paths)
        written = make_split(paths.images, paths.images, defaults.TRAIN_PER_CLASS,
                             defaults.TEST_PER_CLASS, args.seed)
        report(f"wrote {written['train']}, {written['test']}, {written['labels']} "
               f"(seed {args.seed})")
        if args.relabel:
            paths.landmarks.unlink(missing_ok=True)
        defaults.ensure_landmarks(paths, report)
        for size in args.size:
            sized = defaults.DefaultPaths(paths.repo, size)
            defaults.build_dbs(sized, gray=args.gray, report=report)
            defaults.build_mean(sized, report)
    except DataError as exc:
        return fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
