"""Convert images and their box annotations to an LMDB/LevelDB of AnnotatedDatum records, the
input of SSD's AnnotatedData layer (weiliu89/caffe's convert_annoset / create_annoset.py).

Usage:
  convert_annoset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
LISTFILE lines are "image_path annotation_path" (detection) or "image_path label"
(--anno-type classification), both relative to ROOTFOLDER (plain concatenation: keep the
trailing slash). Annotations are PASCAL VOC XML (--label-type xml, names looked up in
--label-map-file, e.g. SSD's labelmap_voc.prototxt) or text files of "label xmin ymin xmax
ymax" lines in pixels (--label-type txt). Boxes are stored normalised by the image size.
Keys are "%08d_<image path>" (line index after --shuffle). Unreadable images are reported and
skipped; an invalid XML file or a name missing from the label map stops the tool with the
list line and file named. The database appears at DB_NAME only when complete.

SSD's data/VOC0712/create_data.sh is, per subset:
  convert_annoset --anno-type detection --label-map-file labelmap_voc.prototxt \\
      --check-label --encoded --encode-type jpg ~/data/VOCdevkit/ trainval.txt VOC0712_trainval_lmdb
Flags take the fork's underscore spellings too (--label_map_file=..., --encoded=true).
"""
from __future__ import annotations

import argparse
import sys

from caffe_compat.commands.common import fail, gflags_argv, shown
from caffe_compat.formats.errors import CaffeCompatError

BOOL_FLAGS = {"gray", "shuffle", "check_size", "encoded", "check_label"}
FLAGS = BOOL_FLAGS | {"backend", "anno_type", "label_type", "label_map_file", "min_dim",
                      "max_dim", "resize_width", "resize_height", "encode_type", "seed"}


def _both(name: str) -> list[str]:
    return [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [FLAGS] ROOTFOLDER/ "
                                 "LISTFILE DB_NAME",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("positional", nargs="*", help=argparse.SUPPRESS)
    add = ap.add_argument
    add(*_both("anno_type"), default="detection", choices=("detection", "classification"),
        help="what the list's second column is (default detection: an annotation file)")
    add(*_both("label_type"), default="xml", choices=("xml", "txt"),
        help="annotation file format (default xml: PASCAL VOC)")
    add(*_both("label_map_file"), default="", help="LabelMap prototxt: name -> label")
    add(*_both("check_label"), action="store_true",
        help="refuse a label map that lists a name twice")
    add(*_both("min_dim"), type=int, default=0,
        help="scale images up so the short side is at least this (aspect kept; 0: off)")
    add(*_both("max_dim"), type=int, default=0,
        help="then scale them down so the long side is at most this (0: off)")
    add(*_both("resize_height"), type=int, default=0, help="height images are resized to")
    add(*_both("resize_width"), type=int, default=0, help="width images are resized to")
    add("--gray", action="store_true", help="store grey-scale images (default BGR)")
    add("--encoded", action="store_true", help="store the encoded image (the file's bytes "
        "when nothing changes it)")
    add(*_both("encode_type"), default="", help="encode images as this ('jpg', 'png'); "
        "implies --encoded")
    add(*_both("check_size"), action="store_true",
        help="check that all raw records have the same size")
    add("--shuffle", action="store_true", help="shuffle the list order")
    add("--seed", type=int, default=None, help="seed of --shuffle (default: fresh)")
    add("--backend", default="lmdb", choices=("lmdb", "leveldb"), help="database kind")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(gflags_argv(argv, FLAGS, BOOL_FLAGS))
    if len(args.positional) != 3:
        return fail("expected ROOTFOLDER/ LISTFILE DB_NAME; see --help")
    from caffe_compat.data.annoset import AnnosetOptions, convert_annoset
    root, list_file, db_name = args.positional
    options = AnnosetOptions(
        anno_type=args.anno_type, label_type=args.label_type,
        label_map_file=args.label_map_file, check_label=args.check_label,
        min_dim=args.min_dim, max_dim=args.max_dim, resize_height=args.resize_height,
        resize_width=args.resize_width, gray=args.gray, encoded=args.encoded,
        encode_type=args.encode_type, check_size=args.check_size)
    try:
        report = convert_annoset(root, list_file, db_name, options, backend=args.backend,
                                 shuffle=args.shuffle, seed=args.seed)
    except CaffeCompatError as exc:
        return fail(str(exc))
    for line in report.skipped:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {shown(db_name)}: {report.written} records"
          + (f", {len(report.skipped)} warnings" if report.skipped else ""))
    return 0
