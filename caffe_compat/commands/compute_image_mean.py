"""Compute the mean image of a database (or image list) — Caffe's compute_image_mean.

Usage:
  compute_mean.py [FLAGS] INPUT_DB [OUTPUT_FILE]
Sums every record in database order in float32 and divides by the count, exactly as Caffe
(so the file equals Caffe's byte for byte), and writes a binary BlobProto with the legacy
num=1, channels, height, width fields — the mean_file of a transform_param. Encoded records
are decoded with their native channels. Prints the per-channel means ("mean_value channel
[c]: v"), usable as mean_value instead of a file. Without OUTPUT_FILE nothing is written.
INPUT may also be a Caffe image list file: the images are read as the ImageData layer
would (--root_folder, --gray, --resize_height/--resize_width).

With no arguments: the mean of each default training set, written next to it where
models/*/train_val.prototxt expect it:
  data/fashion50_lmdb/train      -> data/fashion50_lmdb/mean.binaryproto
  data/fashion50_lmdb_256/train  -> data/fashion50_lmdb_256/mean.binaryproto
(and any other data/fashion50_lmdb_<N> already built); the split lists and databases are
built first with their defaults if missing.
"""
from __future__ import annotations

import argparse
import os
import sys


from caffe_compat.commands.common import fail, gflags_argv, shown
from caffe_compat.formats.errors import CaffeCompatError as DataError

BOOL_FLAGS = {"gray"}
FLAGS = BOOL_FLAGS | {"backend", "root_folder", "resize_height", "resize_width"}


def main(argv: list[str] | None = None, defaults=None) -> int:
    """``defaults(args)`` runs the no-argument mode; without it (the installed
    command) the inputs are required."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [FLAGS] INPUT_DB "
                                 "[OUTPUT_FILE]", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", default=None, help=argparse.SUPPRESS)
    ap.add_argument("output", nargs="?", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                    help="the backend {lmdb, leveldb} of INPUT_DB (default lmdb)")
    ap.add_argument("--root_folder", default="", help="list input: prefix of each path")
    ap.add_argument("--gray", action="store_true", help="list input: read images as grey")
    ap.add_argument("--resize_height", type=int, default=0, help="list input: resize height")
    ap.add_argument("--resize_width", type=int, default=0, help="list input: resize width")
    args = ap.parse_args(gflags_argv(argv, FLAGS, BOOL_FLAGS))
    from caffe_compat.formats.blob_io import write_blobproto
    from caffe_compat.data.convert import channel_means, compute_mean
    try:
        if args.input is None:
            if defaults is None:
                return fail("no INPUT_DB given; see --help")
            return defaults(args)
        source, output, backend = args.input, args.output, args.backend
        if not os.path.exists(source):
            raise DataError(f"{source}: input database or list does not exist")
        mean = compute_mean(source, backend if os.path.isdir(source) else None,
                            root_folder=args.root_folder, gray=args.gray,
                            resize_height=args.resize_height, resize_width=args.resize_width)
    except DataError as exc:
        return fail(str(exc))
    if output:
        if os.path.isdir(output):
            return fail(f"{output}: is a directory; OUTPUT_FILE must name a file")
        try:
            write_blobproto(output, mean)
        except OSError as exc:   # missing folder, read-only filesystem, full disk
            return fail(f"{output}: cannot write the mean file ({exc.strerror or exc})")
        print(f"wrote {shown(output)} ({'×'.join(map(str, mean.shape))} mean of {shown(source)})")
    print(f"Number of channels: {mean.shape[0]}")
    for c, value in enumerate(channel_means(mean)):
        print(f"mean_value channel [{c}]: {value:g}")
    return 0
