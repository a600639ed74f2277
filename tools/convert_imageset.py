#!/usr/bin/env python3
"""convert_imageset from the checkout: the installed ``convert_imageset`` command, plus this repository's
no-argument mode (build the default data set the models read). ``--help`` lists the flags."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.common import fail, repo_root, say  # noqa: E402,F401
from caffe_compat.commands.convert_imageset import main as _main  # noqa: E402
from caffe_compat.commands.convert_imageset import *  # noqa: E402,F401,F403


def main(argv: list[str] | None = None) -> int:
    return _main(argv, defaults=default_mode)


def default_mode(args) -> int:
    from experiments.defaults import DEFAULT_SIZES, DefaultPaths, build_dbs
    if args.landmarks or args.check_size or args.seed is not None:
        return fail("--landmarks/--check_size/--seed need explicit ROOTFOLDER/ LISTFILE DB_NAME")
    h, w = args.resize_height, args.resize_width
    if h != w or (h and h < 0):
        return fail("the default data set is square: give --resize_height equal to "
                    "--resize_width")
    if args.shuffle:
        return fail("the default train list is already shuffled (make_split --seed)")
    for size in ([h] if h else DEFAULT_SIZES):
        build_dbs(DefaultPaths(repo_root(__file__), size), gray=args.gray, backend=args.backend,
                  encoded=args.encoded, encode_type=args.encode_type, report=say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
