#!/usr/bin/env python3
"""Pretrain models on Fashion-MNIST minus data/fashion50, for the fine-tuned Table 1.

Needs the IDX files (apt-get install dataset-fashion-mnist). Builds
data/fmnist_pretrain_lmdb_72_color/ once (59,500 train / 10,000 test records), then trains
each --model with models/<model>/solver_pretrain.prototxt and writes
runs/pretrain/<model>/<model>_pretrained.caffemodel (not committed). A killed run resumes from
its newest snapshot when started again; a finished model is skipped.

  python tools/pretrain.py --model vgg16_landmark_64,vgg16_64,alexnet_64 --threads 2
  python tools/pretrain.py --precision auto --layout auto   # bf16 where the CPU has AMX
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from experiments import pretrain
    from experiments.full_fashion_mnist import add_speed_args
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vgg16_landmark_64,vgg16_64,alexnet_64",
                    help="comma-separated models/ folders with a solver_pretrain.prototxt")
    ap.add_argument("--idx-dir", default=str(pretrain.DEFAULT_IDX),
                    help=f"Fashion-MNIST IDX files (default {pretrain.DEFAULT_IDX})")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_speed_args(ap)
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from caffe_compat.formats import glog
    from caffe_compat.formats.errors import CaffeCompatError
    glog.set_stderr(False)
    try:
        for model in filter(None, args.model.split(",")):
            path = pretrain.pretrain(model.strip(), Path(args.idx_dir),
                                     precision=args.precision, layout=args.layout)
            print(f"{model}: {path}")
    except (CaffeCompatError, ValueError) as exc:    # ValueError: an IDX set with no image left
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last snapshot",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
