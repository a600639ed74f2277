#!/usr/bin/env python3
"""Train a net from a solver prototxt: Caffe's ``caffe train``, with the same flags.

Examples (run from the repository root; the solver's paths are relative to it):
  python tools/train.py --solver models/alexnet_64/solver.prototxt
  python tools/train.py --solver S.prototxt --weights pretrained.caffemodel      # fine-tune
  python tools/train.py --solver S.prototxt --snapshot snap/net_iter_1000.solverstate  # resume
  python tools/train.py --solver S.prototxt --gpu 0 --precision bf16

Writes <snapshot_prefix>_iter_N.caffemodel/.solverstate, the log <snapshot_prefix>.log (glog
format, also on stderr; read it with tools/parse_log.py or Caffe's parse_log.py; every run
appends to it), <snapshot_prefix>.metrics.jsonl and the plot <snapshot_prefix>.png (redrawn at
every test), and prints them with the final test outputs at the end. Ctrl-C snapshots and
stops (resume with --snapshot, or --snapshot auto for the newest complete snapshot); SIGHUP
snapshots and continues. A resume restores the iteration, the weights and the solver history,
and data layers continue at the batch an uninterrupted run would read, so the resumed run is
bit-identical to one never stopped. --gpu 0,1 / all and --cpu-procs N train data-parallel
(torch.distributed). The installed `caffe train` is the same command.
Caffe's spellings work too: -solver S, --weights=W. Errors are one line; --debug adds the
traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands import train as train_cmd  # noqa: E402
from caffe_compat.commands.common import caffe_argv, run  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    train_cmd.add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(caffe_argv(sys.argv[1:] if argv is None else argv, ap))
    return run(train_cmd.main, args, "train.py")


if __name__ == "__main__":
    sys.exit(main())
