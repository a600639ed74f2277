"""Add Caffe's ten-crop test to a finished full Fashion-MNIST report.

tools/full_fashion_mnist.py tests the centre crop, as Caffe's TEST Data layer does. A Caffe
user scoring images with classify.py gets its default ``--oversample`` instead: ten crops
per image, probabilities averaged. This reads a run's JSON report, scores the run's final
caffemodel that way on the run's test LMDB (experiments/reproduce/oversample.py), stores
the result under "oversample" and rewrites the markdown beside it. Training is untouched.

  python tools/oversample_report.py results/fmnist_full_bf16_c40.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from experiments.full_fashion_mnist import REPO, TARGET, db_folder, parse_args as run_args


def run_inputs(result: dict) -> tuple[argparse.Namespace, dict]:
    """The run's own arguments (its recorded command, paths read from the repository root)
    and where its caffemodel, deploy, records and mean are."""
    argv = shlex.split(result["command"])[2:]          # drop "python tools/..."
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        args = run_args(argv)
    finally:
        os.chdir(cwd)
    model = Path(result["snapshot_check"]["model"])
    db = db_folder(args)
    paths = {"model": model, "deploy": model.parent / "deploy.prototxt",
             "db": db / "test", "mean": db / "mean.binaryproto", "net": REPO / result["net"]}
    for name, path in paths.items():
        if not path.exists():
            raise SystemExit(f"error: {path}: the run's {name} is missing (caffemodels and "
                             "LMDBs are not committed: rerun the command in the report)")
    return args, paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a results/fmnist_full*.json written by full_fashion_mnist")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    opts = ap.parse_args(argv)
    import torch

    from caffe_compat.formats.blob_io import read_text_proto
    from caffe_compat.proto import caffe_pb2
    from experiments.reproduce import oversample, scale_report
    from experiments.reproduce.protocol import atomic_write_text
    if opts.threads:
        torch.set_num_threads(opts.threads)
    json_path = Path(opts.report)
    result = json.loads(json_path.read_text())
    args, paths = run_inputs(result)
    scale, crop = oversample.eval_transform(read_text_proto(paths["net"], caffe_pb2.NetParameter))

    def progress(done, total):
        if done % 2000 < 20 or done == total:
            print(f"  {done}/{total} images", file=sys.stderr, flush=True)
    check = oversample.score(os.fspath(paths["deploy"]), os.fspath(paths["model"]),
                             os.fspath(paths["db"]), os.fspath(paths["mean"]), scale, crop,
                             progress=progress)
    check["model"] = os.fspath(paths["model"])
    result["oversample"] = check
    md_path = json_path.with_suffix(".md")
    text = scale_report.markdown(result, args.batch_size, os.path.relpath(args.solver, REPO),
                                 size=args.size, pad=args.pad, color=args.color, target=TARGET,
                                 plot_name=md_path.with_suffix(".png").name)
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    atomic_write_text(md_path, text)
    print(oversample.markdown_row(check))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
