#!/usr/bin/env python3
"""Receptive field, kernel capacity, parameters and FLOPs of each conv stage of a net.

For every PROTOTXT: one row per conv stage (conv<k> / conv<k>_<j> layers) with its exact
receptive field, its kernel capacity normalised so that conv1 = 1, its parameters and FLOPs
per image, then the net's totals and the paper's Table 2/3 layout (with the paper's figures
beside ours for vgg16_landmark and AlexNet). Definitions are in caffe_compat/analysis.py and
are printed with the report.

Kernel capacity needs weights: give a .caffemodel with --weights (one per prototxt, in
order); without it the capacity is that of the fillers' random initialisation (seeded by
--seed), which says nothing about training and is marked as such.

Examples:
    python tools/net_analysis.py models/alexnet/deploy.prototxt
    python tools/net_analysis.py models/vgg16_landmark_64/deploy.prototxt \\
        --weights runs/vgg16_landmark_64/vgg16_landmark_64_iter_1000.caffemodel
    python tools/net_analysis.py models/vgg16_landmark/deploy.prototxt \\
        models/alexnet/deploy.prototxt --markdown --out results/tables23.md
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from caffe_compat.formats.atomic import write_text  # noqa: E402
from caffe_compat.engine import analysis  # noqa: E402
from caffe_compat.engine.layers.base import TEST, TRAIN  # noqa: E402

# The paper's Tables 2 and 3 (receptive field, kernel capacity for Conv1..Conv5).
PAPER = {
    "table 2 (improved VGG16)": ([6, 18, 59, 110, 142], [1, 0.541, 0.824, 0.737, 0.583]),
    "table 3 (AlexNet)": ([12, 54, 98, 132, 165], [1, 0.287, 0.258, 0.213, 0.171]),
}

CONVENTIONS = """\
Conventions (caffe_compat/analysis.py):
- conv stage k = the Convolution layers named conv<k> or conv<k>_<j>; its receptive field (RF)
  is that of its last conv's top, exact from the graph (padding counted, max over positions),
  in input pixels; jump = input pixels between neighbouring positions.
- capacity = normalised effective rank of each conv's filter matrix (out x in/group*kh*kw):
  exp(entropy of the normalised singular values) / min(out, in/group*kh*kw); mean over the
  stage's convs; 'rel' divides by stage 1 (conv1 = 1). The paper does not define its metric.
- FLOPs = 2 x multiply-accumulates of Convolution, Deconvolution and InnerProduct layers per
  image; biases, pooling, LRN, activations, element-wise layers and losses are not counted.
- params = all parameter blobs (bias included); trainable = those with lr_mult != 0."""


def paper_key(name: str) -> str | None:
    low = name.lower()
    if "landmark" in low:
        return "table 2 (improved VGG16)"
    if "alexnet" in low:
        return "table 3 (AlexNet)"
    return None


def _m(x: float) -> str:
    return f"{x / 1e6:,.2f}M"


def _g(x: float) -> str:
    return f"{x / 1e9:,.3f}"


def _rf(field) -> str:
    h, w = field.size
    return str(h) if h == w else f"{h}x{w}"


def _jump(field) -> str:
    h, w = field.jump
    return f"{h:g}" if h == w else f"{h:g}x{w:g}"


def table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def report_text(path: str, report: analysis.Report, weights: str | None, markdown: bool,
                layers: bool) -> str:
    rel = report.relative_capacity()
    source = (f"trained weights {weights}" if weights else
              "the fillers' random initialisation (no --weights): NOT a property of training")
    head = (f"## {report.name} (`{path}`)" if markdown else f"== {report.name} ({path})")
    lines = [head, "",
             f"Input {'x'.join(map(str, report.input_shape[1:]))}; kernel capacity from {source}.",
             ""]
    rows = [["stage", "conv layers", "RF", "jump", "capacity (rel)", "capacity (raw)",
             "params", "GFLOPs"]]
    for s, r in zip(report.stages, rel):
        rows.append([f"conv{s.index}", ", ".join(s.layers), _rf(s.field), _jump(s.field),
                     f"{r:.3f}", f"{s.capacity:.3f}", f"{s.params:,}", _g(2 * s.macs)])
    lines += [table(rows, markdown), ""]
    lines.append(f"Total: {report.params:,} parameters ({report.trainable_params:,} trainable), "
                 f"{_g(report.flops)} GFLOPs per image ({_g(report.macs)} G multiply-adds).")
    lines.append("")
    # The paper's figures are for 224/227 inputs; the CPU variants are not comparable.
    key = paper_key(report.name) if report.input_shape[-1] >= 224 else None
    cols = [f"Conv{s.index}" for s in report.stages]
    rows = [[""] + cols,
            ["Receptive field size (ours)"] + [_rf(s.field) for s in report.stages],
            ["Kernel capacity (ours)"] + [f"{r:.3f}" for r in rel]]
    if key and len(cols) == 5:
        rf, cap = PAPER[key]
        rows.insert(2, ["Receptive field size (paper)"] + [str(v) for v in rf])
        rows.append(["Kernel capacity (paper)"] + [f"{v:g}" for v in cap])
    lines += ["Paper layout" + (f", with the paper's {key}:" if key else ":"), "",
              table(rows, markdown), ""]
    if layers:
        rows = [["layer", "type", "top", "params", "MFLOPs"]]
        for name, kind, shape, params, macs in report.layers:
            rows.append([name, kind, "x".join(map(str, shape[1:])) or "-", f"{params:,}",
                         f"{2 * macs / 1e6:,.2f}"])
        lines += [table(rows, markdown), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prototxt", nargs="+", help="net definitions (deploy or train_val)")
    ap.add_argument("--weights", action="append", default=[],
                    help="caffemodel for the capacity; repeat once per prototxt, in order")
    ap.add_argument("--phase", choices=("TRAIN", "TEST"), default="TEST",
                    help="phase to build train_val nets in (default TEST)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--layers", action="store_true", help="also list every layer")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for the fillers when there are no weights (default 0)")
    ap.add_argument("--out", help="also write the report to this file, the command on top")
    args = ap.parse_args(argv)
    if len(args.weights) > len(args.prototxt):
        ap.error(f"{len(args.weights)} --weights for {len(args.prototxt)} prototxts; give at "
                 "most one per prototxt, in the same order")
    for path in args.prototxt + args.weights:
        if not os.path.exists(path):
            ap.error(f"{path}: no such file")

    command = "python tools/net_analysis.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    parts = [f"# Per-stage analysis: receptive field, kernel capacity, parameters, FLOPs\n\n"
             f"Made by `{command}`\n" if args.markdown else f"# {command}\n"]
    for i, path in enumerate(args.prototxt):
        weights = args.weights[i] if i < len(args.weights) else None
        torch.manual_seed(args.seed)
        net = analysis.load_net(path, TRAIN if args.phase == "TRAIN" else TEST, weights)
        parts.append(report_text(path, analysis.analyse(net), weights, args.markdown,
                                 args.layers))
        del net
    parts.append(CONVENTIONS)
    text = "\n".join(parts) + "\n"
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
