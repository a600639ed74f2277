#!/usr/bin/env python3
"""Silhouette landmarks for product photos on plain backgrounds, in DeepFashion's format.

For each image: background level = median of the border pixels; Otsu's threshold on the
distance from it gives the foreground; the largest contour, filled, is the garment. Its
extreme points give the 8 DeepFashion landmarks (left = image left):
  collar L/R = top-left / top-right corners (min x+y, min y-x)
  sleeve L/R = leftmost / rightmost points
  waist  L/R = left / right edge on the middle row of the bounding box
  hem    L/R = bottom-left / bottom-right corners (max y-x, max x+y)
(ties: the middle of the tied points). Output: list_landmarks.txt with a count line, a
header line and "image_name 3 1 v1 x1 y1 ... v8 x8 y8" per image (clothes_type 3 = all 8
landmarks, visibility 0 = visible; an image with no foreground gets all 1 = invisible).
convert_imageset.py --landmarks and ImageData's landmark_file read this file.

With no arguments: ROOT = data/fashion50 of this checkout, every image under it, output
ROOT/list_landmarks.txt. --overlay DIR also writes each image enlarged with its numbered
points (0..7 in the order above) as DIR/<image path>.png, to check them by eye.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.common import fail, repo_root, shown  # noqa: E402
from caffe_compat.formats.errors import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=None,
                    help="image folder (default data/fashion50)")
    ap.add_argument("listfile", nargs="?", default=None,
                    help="Caffe list of images to annotate (default: every image under ROOT)")
    ap.add_argument("-o", "--output", default=None,
                    help="landmark file to write (default ROOT/list_landmarks.txt)")
    ap.add_argument("--overlay", metavar="DIR", default=None,
                    help="also write PNGs with the landmarks drawn into DIR")
    ap.add_argument("--zoom", type=int, default=8, help="overlay enlargement (default 8)")
    args = ap.parse_args(argv)
    from caffe_compat.data.image_list import read_image_list
    from caffe_compat.data.landmarks import annotate_images, write_landmarks
    from caffe_compat.data.split import all_images
    root = Path(args.root) if args.root else repo_root(__file__) / "data" / "fashion50"
    try:
        if not root.is_dir():
            raise DataError(f"{root}: image folder does not exist")
        if args.listfile:
            rel = [e.path for e in read_image_list(args.listfile)]
        else:
            rel = all_images(root)
            if not rel:
                raise DataError(f"{root}: no images found")
        results = annotate_images(root, rel, args.overlay, args.zoom)
    except DataError as exc:
        return fail(str(exc))
    output = Path(args.output) if args.output else root / "list_landmarks.txt"
    write_landmarks(output, results)
    empty = sum(1 for _, lm in results if not lm[:, 2].any())
    print(f"wrote {shown(output)} ({len(results)} images"
          + (f", {empty} without a silhouette" if empty else "") + ")"
          + (f"; overlays in {shown(args.overlay)}" if args.overlay else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
