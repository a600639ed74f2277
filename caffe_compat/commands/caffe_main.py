"""The ``caffe`` command-line brew: train, test, time and device_query, with Caffe's flags.

  python tools/caffe.py train --solver S.prototxt [--weights W | --snapshot S.solverstate]
                              [--gpu 0] [--iterations N]
  python tools/caffe.py test --model M.prototxt --weights W.caffemodel [--iterations 50]
  python tools/caffe.py time --model M.prototxt [--iterations 50]
  python tools/caffe.py device_query [--gpu 0|all]
  python tools/caffe.py dashboard [--host 127.0.0.1] [--port 8080] [--workdir DIR]
                                  [--data-root DIR]

test prints each batch's outputs and their means (with Caffe's "(* w = ... loss)"); time
prints the average forward and backward milliseconds of every layer, then the forward,
backward and forward-backward averages. `caffe.py COMMAND --help` lists each command's flags.
Caffe's spellings work too (-model M, --iterations=10).
"""
from __future__ import annotations

import argparse
import shlex
import sys


from caffe_compat.commands import device as devices
from caffe_compat.commands import bundle, dataset, fit, score, test_cmd, time_cmd, train as train_cmd
from caffe_compat.commands.common import add_debug_flag, caffe_argv, run
from caffe_compat.formats import glog

COMMANDS = {
    "train": (train_cmd, "train or fine-tune a model from a solver prototxt"),
    "test": (test_cmd, "score a model: per-batch and mean outputs over --iterations batches"),
    "time": (time_cmd, "benchmark a model: per-layer forward/backward execution time"),
    "dataset": (dataset, "a folder of class sub-folders -> split, LMDBs, mean, summary"),
    "fit": (fit, "train a classifier on a folder of class sub-folders, ending in a bundle"),
    "score": (score, "accuracy, per-class precision/recall and confusion matrix of a bundle"),
    "bundle": (bundle, "a trained model as a bundle folder: deploy, weights, labels, "
                       "preprocessing, model card"),
}

# Commands that sit above this layer (the dashboard) join the brew through this entry-point
# group in setup.cfg, so the brew never imports them: the import direction stays one way.
EXTENSION_GROUP = "caffe_compat.commands"


def _extensions() -> dict:
    """{name: (module, help)} of the installed extension commands, loaded on first use."""
    from importlib.metadata import entry_points
    found = {}
    for ep in entry_points(group=EXTENSION_GROUP):
        module = ep.load()
        found[ep.name] = (module, getattr(module, "HELP", ep.name))
    return found


def _device_query_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpu", default="all", metavar="0|0,1|all",
                    help="the CUDA devices to describe (default all)")
    add_debug_flag(ap)


def _device_query(args: argparse.Namespace) -> int:
    ids = devices.parse_gpu_flag(args.gpu)
    for line in devices.device_query(ids):
        glog.info(line, "common.cpp:211")
    return 0


def parser(prog: str = "caffe") -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own parser."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for name, (module, text) in {**COMMANDS, **_extensions()}.items():
        p = commands[name] = sub.add_parser(name, help=text, description=(module.__doc__ or text),
                                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    p = commands["device_query"] = sub.add_parser(
        "device_query", help="show the CUDA devices' properties",
        description="Show the properties of the CUDA devices PyTorch sees, or say why there "
                    "are none (exit status 1).")
    _device_query_args(p)
    p.set_defaults(func=_device_query)
    return ap, commands


def main(argv: list[str] | None = None, prog: str = "caffe") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, commands = parser(prog)
    if argv[:1] in (["-h"], ["--help"]):
        ap.print_help()
        return 0
    if not argv or argv[0] not in commands:
        ap.print_usage(sys.stderr)
        what = f"unknown command '{argv[0]}'" if argv else "no command given"
        print(f"{prog}: error: {what} (known: {', '.join(commands)})", file=sys.stderr)
        return 1
    args = ap.parse_args([argv[0]] + caffe_argv(argv[1:], commands[argv[0]]))
    args.command_line = shlex.join(["caffe"] + argv)     # for records (dataset.json, fit.json)
    return run(args.func, args, f"{prog} {argv[0]}")


# python -m caffe_compat.commands.caffe_main: how the dashboard starts its workers
if __name__ == "__main__":
    sys.exit(main())
