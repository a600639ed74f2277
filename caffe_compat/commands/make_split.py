"""Split an image folder tree into Caffe train/test lists: N images per class each.

ROOT holds one sub-folder per class (ROOT/<class>/<image>). Writes, into --out-dir
(default ROOT):
  train.txt   "<class>/<image> <label>" lines, --train-per-class per class, shuffled as a
              whole (a Data layer reads its database in order and never shuffles);
  test.txt    --test-per-class per class, grouped by class;
  labels.txt  the class names, line i = label i.
Label order comes from --labels, else ROOT/labels.txt when present, else sorted folder names.
The images of each class are drawn at random with --seed, without overlap; a class with
fewer than train+test images is an error that names it.

With no arguments: ROOT = data/fashion50 in this checkout, 40 train + 10 test per class,
seed 0 — the paper's protocol on the embedded Fashion-MNIST images. Next steps:
  python tools/convert_imageset.py     (train/test LMDBs)
  python tools/compute_mean.py         (mean.binaryproto)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from caffe_compat.commands.common import fail, repo_root, shown
from caffe_compat.formats.errors import DataError
from caffe_compat.data.split import make_split

_PACKAGE_INIT = Path(__file__).resolve().parents[1] / "__init__.py"   # checkout = its parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=None,
                    help="image folder with one sub-folder per class (default data/fashion50)")
    ap.add_argument("--out-dir", default=None, help="where the lists go (default ROOT)")
    ap.add_argument("--train-per-class", type=int, default=40, help="default 40")
    ap.add_argument("--test-per-class", type=int, default=10, help="default 10")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the draw (default 0)")
    ap.add_argument("--labels", default=None,
                    help="class names by label, one per line (default ROOT/labels.txt if "
                         "present, else sorted folder names)")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else repo_root(_PACKAGE_INIT) / "data" / "fashion50"
    if args.train_per_class < 0 or args.test_per_class < 0:
        return fail("--train-per-class and --test-per-class must be >= 0")
    try:
        paths = make_split(root, args.out_dir, args.train_per_class, args.test_per_class,
                           args.seed, args.labels)
    except DataError as exc:
        return fail(str(exc))
    print(f"wrote {shown(paths['train'])}, {shown(paths['test'])}, {shown(paths['labels'])} "
          f"({args.train_per_class}/{args.test_per_class} per class, seed {args.seed})")
    return 0

