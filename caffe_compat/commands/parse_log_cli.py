"""Parse a Caffe training log into two CSV files, as Caffe's tools/extra/parse_log.py does.

  python tools/parse_log.py LOGFILE OUTPUT_DIR [--delimiter ,] [--verbose]

Writes OUTPUT_DIR/<log name>.train (NumIters, Seconds, LearningRate, then each "Train net
output" name) and OUTPUT_DIR/<log name>.test (the same with the "Test net output" names; test
net #k > 0 goes to .test<k>). A log of several runs (caffe train appends each unrelated run
to the same log) gives the last run those names and each earlier run .run<k>.train/.test.
Reads this project's logs and real Caffe's, old
("Iteration N, loss = X") and new ("Iteration N (x iter/s, ...), loss = X") formats, with
I<MMDD> or I<YYYYMMDD> prefixes. The LearningRate of a row is the rate logged for that
iteration (Caffe's parser lags it by one display interval).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from caffe_compat.commands.common import add_debug_flag, run
from caffe_compat.commands.logparse import parse_log, save_csv_files


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parse_log", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logfile_path", help="path to the log file")
    ap.add_argument("output_dir", help="folder for the output CSV files (created if missing)")
    ap.add_argument("--delimiter", default=",", help="column delimiter (default ',')")
    ap.add_argument("--verbose", action="store_true", help="print the names of the files written")
    add_debug_flag(ap)
    return ap


def _main(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.logfile_path):
        raise FileNotFoundError(f"{args.logfile_path}: no such log file")
    data = parse_log(args.logfile_path)
    if not data.train and not data.test:
        raise ValueError(f"{args.logfile_path}: no training or test lines found (is it a "
                         "Caffe training log?)")
    os.makedirs(args.output_dir, exist_ok=True)
    for path in save_csv_files(args.logfile_path, args.output_dir, data, args.delimiter):
        if args.verbose:
            print(f"Wrote {path}")
    if len(data.runs()) > 1:
        print(f"{args.logfile_path} holds {len(data.runs())} separate runs (a new run was "
              "started over the same snapshot_prefix): the last one is in the .train/.test "
              "files, each earlier one in .run<k>.train/.test")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(_main, args, "parse_log")

