#!/usr/bin/env python3
"""The benchmark suite: inference and training speed, peak memory, machine description.

    python benchmarks/run.py                      # every net, defaults below
    python benchmarks/run.py --quick              # smoke run in seconds (tiny inputs)
    python benchmarks/run.py --nets resnet50,vgg16 --iters 5 --rounds 3
    python benchmarks/run.py --train-nets vgg16 --train-batch 8 --train-size 224
    python benchmarks/run.py --nets lenet,mtcnn_onet,ssd_face --batch 1,16 --engine auto

Inference (batch --batch, fp32) runs each net of benchmarks/nets/ through the NetModule, the
fused module (BatchNorm folded), its channels-last and TorchScript-frozen forms, the pycaffe
API, the exported TorchScript and ONNX files (onnxruntime) and OpenCV DNN
(cv2.dnn.readNetFromCaffe on the same prototxt and caffemodel), OpenVINO on the ONNX file and,
with --engine, pycaffe on caffe.Net(..., engine=...), alternating them in this process; the
first table compares pycaffe with the fastest of OpenCV DNN, onnxruntime and OpenVINO. Training times forward+backward of the prototxt-built net and the hand-written
PyTorch net (VGG16, ResNet-50) in each precision and layout, with the fraction of the CPU's
estimated fp32 peak, and (unless --no-memory) each net's peak resident memory in a fresh
process. Writes results/bench/<date>.md and .json (--out changes the folder).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from caffe_compat.engine.allocator import ALLOCATORS, use_allocator  # noqa: E402
from suite import inference, machine, report, training  # noqa: E402

errors: list[str] = []   # per-net failures, reported instead of aborting the suite
NETS = ["alexnet", "googlenet", "vgg16", "resnet50", "squeezenet1_1", "mobilenet_v1"]
SMALL_NETS = ["lenet", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "ultraface_slim", "ssd_face"]
KNOWN = NETS + SMALL_NETS


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: squeezenet1_1 inference at 64x64, VGG16 fp32 training batch "
                         "1 at 32x32, one iteration, one round, no memory processes")
    ap.add_argument("--nets", default=",".join(NETS), help="inference nets (comma list)")
    ap.add_argument("--batch", default="1", help="inference batch(es), e.g. 1,16 (default 1)")
    ap.add_argument("--engine", choices=("auto", "torch", "onnxruntime", "openvino"),
                    help="also time pycaffe net.forward() on caffe.Net(..., engine=ENGINE) "
                         "(column pycaffe_ENGINE)")
    ap.add_argument("--size", type=int, help="inference input size (default: each net's)")
    ap.add_argument("--train-nets", default="vgg16,resnet50", help="training nets ('' = none)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=32)
    ap.add_argument("--precisions", default="fp32,bf16", help="training precisions")
    ap.add_argument("--layouts", default="nchw,nhwc", help="training layouts")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (best counts)")
    ap.add_argument("--skip", default="", help="inference paths to leave out, e.g. onnxruntime")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--allocator", choices=ALLOCATORS, default="system",
                    help="malloc setting for this process and its memory processes, as "
                         "caffe train --allocator (reuse: keep freed memory mapped)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory processes")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "bench"))
    ap.add_argument("--stem", help="file name stem (default: today's date)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    return ap


def _apply_quick(args: argparse.Namespace) -> None:
    args.nets, args.size, args.train_nets = "squeezenet1_1", 64, "vgg16"
    args.train_batch, args.train_size, args.iters, args.rounds = 1, 32, 1, 1
    args.precisions, args.memory = "fp32", False


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_inference(args, nets: list[str]) -> list[dict]:
    out = []
    for batch in (int(b) for b in _split(str(args.batch))):
        for net in nets:
            print(f"inference: {net} (batch {batch})", file=sys.stderr, flush=True)
            try:
                out.append(inference.bench_net(net, HERE / "nets" / f"{net}.prototxt", batch,
                                               args.size, args.iters, args.rounds,
                                               set(_split(args.skip)), args.engine))
            except Exception as exc:  # noqa: BLE001 - one broken net must not lose the others
                errors.append(f"inference {net} (batch {batch}): {type(exc).__name__}: {exc}")
    return out


def run_training(args, nets: list[str], peak: float | None) -> list[dict]:
    out = []
    for net in nets:
        print(f"training: {net}", file=sys.stderr, flush=True)
        prototxt = HERE / "nets" / f"{net}.prototxt"
        try:
            result = training.bench_training(
                net, prototxt, args.train_batch, args.train_size, args.iters, args.rounds,
                _split(args.precisions), _split(args.layouts), ["prototxt", "hand"], peak)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"training {net}: {type(exc).__name__}: {exc}")
            continue
        if args.memory:
            for impl in ("prototxt", "hand"):
                key = f"{impl}/nchw/fp32"
                if key in result["configs"]:
                    spec = {"net": net, "prototxt": str(prototxt), "batch": args.train_batch,
                            "size": args.train_size, "impl": impl, "threads": args.threads,
                            "allocator": args.allocator}
                    result["configs"][key]["peak_rss_bytes"] = training.peak_memory(
                        HERE / "run.py", spec)
        out.append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    child = json.loads(args.memory_child) if args.memory_child else None
    # before any tensor of the suite; a memory process takes its parent's setting
    allocator = use_allocator(child.get("allocator", "system") if child else args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["CAFFE_COMPAT_THREADS"] = str(args.threads)
    if child:
        training.memory_child(child)
        return 0
    if args.quick:
        _apply_quick(args)
    unknown = [n for n in _split(args.nets) + _split(args.train_nets) if n not in KNOWN]
    if unknown:
        print(f"run.py: error: unknown net(s) {', '.join(unknown)} (known: {', '.join(KNOWN)})",
              file=sys.stderr)
        return 2
    results = {"machine": {**machine.describe(), "allocator": allocator.line},
               "command": "python benchmarks/run.py " + " ".join(argv or sys.argv[1:]),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    results["inference"] = run_inference(args, _split(args.nets))
    results["training"] = run_training(args, _split(args.train_nets),
                                       results["machine"]["peak_fp32_gflops"])
    results["machine"]["load_average_end"] = os.getloadavg()
    results["errors"] = errors
    stem = args.stem or datetime.date.today().isoformat()
    md, js = report.write(results, Path(args.out), stem)
    print(md.read_text())
    print(f"wrote {md} and {js}", file=sys.stderr)
    for line in errors:
        print(f"run.py: error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
