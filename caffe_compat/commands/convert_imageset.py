"""Convert a set of images to an LMDB/LevelDB of Caffe Datum records (Caffe's convert_imageset).

Usage:
  convert_imageset.py [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
LISTFILE lines are "relative/path label" (split at the last space); each image is read from
ROOTFOLDER + path (plain concatenation: keep the trailing slash). Records get the keys
"%08d_<path>" (line index after --shuffle) and the same Datum bytes Caffe writes: planar
C×H×W BGR uint8, or the image file itself with --encoded. Unreadable images are reported with
their list line and skipped; the tool fails if none could be written. The database appears
at DB_NAME only when complete, and an existing DB_NAME is an error (as in Caffe).
Flags take Caffe's spellings too (-gray, --gray=true, --resize_height=256).

Landmarks (project extension): --landmarks FILE reads a DeepFashion list_landmarks.txt whose
image names match the list paths and stores 8 × (x, y, visible) per record in
Datum.float_data, scaled with --resize_*. Caffe ignores those floats.

With no positional arguments it builds the project's default databases, the ones
models/*/train_val.prototxt read (replaced if present):
  data/fashion50_lmdb/{train,test}       72×72, for the 64×64 crops of models/*_64
  data/fashion50_lmdb_256/{train,test}   256×256, for the 224/227 crops of the paper's models
from data/fashion50/{train,test}.txt (made first with make_split's defaults if missing),
in colour, with the silhouette landmarks of data/fashion50/list_landmarks.txt. Given
--resize_height=N --resize_width=N, only size N is built (data/fashion50_lmdb_N, or
data/fashion50_lmdb for 72). The other flags apply as given.
Then run: python tools/compute_mean.py
"""
from __future__ import annotations

import argparse
import sys


from caffe_compat.commands.common import fail, gflags_argv, shown
from caffe_compat.formats.errors import CaffeCompatError as DataError

BOOL_FLAGS = {"gray", "shuffle", "check_size", "encoded"}
FLAGS = BOOL_FLAGS | {"backend", "resize_width", "resize_height", "encode_type", "landmarks",
                      "seed"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [FLAGS] ROOTFOLDER/ "
                                 "LISTFILE DB_NAME", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("positional", nargs="*", metavar="ROOTFOLDER/ LISTFILE DB_NAME",
                    help=argparse.SUPPRESS)
    ap.add_argument("--gray", action="store_true",
                    help="treat images as grey-scale ones (default false: 3-channel BGR)")
    ap.add_argument("--shuffle", action="store_true",
                    help="randomly shuffle the order of images and their labels (default false)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of --shuffle (default: a fresh random order)")
    ap.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                    help="the backend {lmdb, leveldb} for storing the result (default lmdb)")
    ap.add_argument("--resize_width", type=int, default=0,
                    help="width images are resized to (default 0: no resize; the no-argument "
                         "mode builds 72 and 256)")
    ap.add_argument("--resize_height", type=int, default=0,
                    help="height images are resized to (default 0: no resize; the "
                         "no-argument mode builds 72 and 256)")
    ap.add_argument("--check_size", action="store_true",
                    help="check that all the datum have the same size (default false)")
    ap.add_argument("--encoded", action="store_true",
                    help="store the encoded image in the datum (default false)")
    ap.add_argument("--encode_type", default="",
                    help="optional: the encoding format ('png', 'jpg', ...); implies encoding")
    ap.add_argument("--landmarks", default=None, metavar="FILE",
                    help="DeepFashion list_landmarks.txt: store 8 landmarks per record")
    return ap


def main(argv: list[str] | None = None, defaults=None) -> int:
    """``defaults(args)`` runs the no-argument mode; without it (the installed
    command) the inputs are required."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(gflags_argv(argv, FLAGS, BOOL_FLAGS))
    try:
        if not args.positional:
            if defaults is None:
                return fail("expected ROOTFOLDER/ LISTFILE DB_NAME; see --help")
            return defaults(args)
        if len(args.positional) != 3:
            return fail("expected ROOTFOLDER/ LISTFILE DB_NAME (or no arguments for the "
                        "default data set); see --help")
        from caffe_compat.data.convert import convert_imageset
        root, list_file, db_name = args.positional
        report = convert_imageset(root, list_file, db_name, gray=args.gray,
                                  shuffle=args.shuffle, backend=args.backend,
                                  resize_height=args.resize_height,
                                  resize_width=args.resize_width, check_size=args.check_size,
                                  encoded=args.encoded, encode_type=args.encode_type,
                                  landmark_file=args.landmarks, seed=args.seed)
    except DataError as exc:
        return fail(str(exc))
    print(f"wrote {shown(db_name)}: {report.written} records"
          + (f", {len(report.skipped)} unreadable images skipped" if report.skipped else ""))
    return 0
