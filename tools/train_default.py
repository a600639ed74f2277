#!/usr/bin/env python3
"""The main job (`make train`): train vgg16_landmark on the embedded Fashion-MNIST set.

With a CUDA GPU it trains the paper's network at 224×224 (models/vgg16_landmark); on a CPU
it trains the same architecture at 64×64 (models/vgg16_landmark_64), because the 224 model
needs hours per epoch on a CPU. It says which it picked and why, builds the default
databases and mean if they are missing (tools/prepare_default_data.py), trains with
tools/train.py (Caffe's log, snapshots, plot), and ends by printing the test accuracy, the
snapshot and the loss/accuracy plot.

    python tools/train_default.py [--model NAME] [--iterations N] [extra tools/train.py flags]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caffe_compat.commands import train as train_cmd  # noqa: E402
from caffe_compat.commands.common import run  # noqa: E402


def pick_model(requested: str | None) -> tuple[str, int, list[str], str]:
    """(model folder, stored image side, device flags, the reason for the choice)."""
    import torch
    if requested:
        size = 72 if requested.endswith("_64") else 256
        gpu = ["--gpu", "0"] if torch.cuda.is_available() else []
        return requested, size, gpu, "asked for with --model"
    if torch.cuda.is_available():
        return ("vgg16_landmark", 256, ["--gpu", "0"],
                f"a CUDA GPU is present ({torch.cuda.get_device_name(0)}): the paper's 224x224 net")
    return ("vgg16_landmark_64", 72, [],
            "no CUDA GPU: the 64x64 CPU variant of the same architecture (the 224x224 net "
            "needs hours per epoch on a CPU)")


def ensure_data(size: int) -> None:
    """Build data/fashion50 split, LMDBs and mean for this image side if any is missing."""
    from experiments import defaults
    paths = defaults.DefaultPaths(ROOT, size)
    lmdb = defaults.lmdb_dir(ROOT, size)
    if (lmdb / "train").is_dir() and (lmdb / "test").is_dir() and (lmdb / "mean.binaryproto").is_file():
        return
    print(f"train_default: building the default data at {size}x{size} in {lmdb} ...", flush=True)
    defaults.ensure_split(paths)
    defaults.ensure_landmarks(paths)
    defaults.build_dbs(paths)
    defaults.build_mean(paths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a folder under models/ (default: chosen by device)")
    args, extra = ap.parse_known_args(argv)
    model, size, device_flags, why = pick_model(args.model)
    print(f"train_default: training models/{model} — {why}", flush=True)
    ensure_data(size)
    tap = argparse.ArgumentParser(prog="train.py")
    train_cmd.add_arguments(tap)
    targs = tap.parse_args(["--solver", f"models/{model}/solver.prototxt", *device_flags, *extra])
    return run(train_cmd.main, targs, "train_default.py")


if __name__ == "__main__":
    import os
    os.chdir(ROOT)                       # the solvers' paths are relative to the repo root
    sys.exit(main())
