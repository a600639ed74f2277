"""Plot a Caffe training log: smoothed training loss, test loss and test accuracy, to a PNG.

  python tools/plot_log.py LOGFILE [--out PLOT.png] [--title TEXT]

Reads this project's logs and real Caffe's (see tools/parse_log.py). Default output: the log's
path with .png instead of its extension. Needs no display (matplotlib's Agg renderer).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from caffe_compat.commands.common import add_debug_flag, run
from caffe_compat.commands.plot import plot_log


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plot_log", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logfile_path", help="path to the log file")
    ap.add_argument("--out", help="the PNG to write (default: LOGFILE with .png)")
    ap.add_argument("--title", help="plot title (default: the log's file name)")
    add_debug_flag(ap)
    return ap


def _main(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.logfile_path):
        raise FileNotFoundError(f"{args.logfile_path}: no such log file")
    out = args.out or os.path.splitext(args.logfile_path)[0] + ".png"
    print(plot_log(args.logfile_path, out, args.title))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(_main, args, "plot_log")

