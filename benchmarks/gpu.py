#!/usr/bin/env python3
"""Inference on a CUDA GPU: pycaffe in GPU mode against the GPU runtimes installed here.

    python benchmarks/gpu.py                          # every suite net, batch 1 and 16
    python benchmarks/gpu.py --nets lenet,mtcnn_onet --batch 1 --iters 50

Per net of benchmarks/nets/ (random weights, BatchNorm statistics as after training), alternated
in this process, host array in and host array out as a pycaffe user calls it:

- ``pycaffe_gpu``: ``caffe.set_mode_gpu()``, ``net.forward()`` (the fused net replayed from a
  CUDA graph where the forward allows it; engine/net/inference_cache.py);
- ``pycaffe_gpu_eager``: the same with ``$CAFFE_COMPAT_CUDA_GRAPHS=0`` (what the graph saves);
- ``onnxruntime_cuda``: onnxruntime's CUDA provider on the tools/export.py ONNX file, where
  the onnxruntime installed has it (``onnxruntime-gpu``);
- ``pycaffe_cpu``: the same net on the CPU, for scale.

Writes results/bench/<date>-gpu.md and .json; the table gives each column's ms and the
fastest peer / pycaffe_gpu ratio (above 1: pycaffe is faster). Needs CUDA; exits 2 without.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import caffe_compat as caffe  # noqa: E402
from caffe_compat.commands import export as exporting  # noqa: E402
from caffe_compat.engine.net.inference_cache import GRAPHS_ENV  # noqa: E402
from caffe_compat.formats.atomic import write_text  # noqa: E402
from suite.inference import deploy_files  # noqa: E402
from suite.timing import alternate  # noqa: E402

NETS = ["lenet", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "ultraface_slim", "ssd_face",
        "squeezenet1_1", "mobilenet_v1", "alexnet", "googlenet", "resnet50", "vgg16"]
PEERS = ("onnxruntime_cuda",)


def _pycaffe(deploy: Path, caffemodel: Path, x: np.ndarray, out: str, gpu: bool, graphs: bool):
    os.environ[GRAPHS_ENV] = "1" if graphs else "0"
    if gpu:
        caffe.set_mode_gpu()
    try:
        net = caffe.Net(str(deploy), str(caffemodel), caffe.TEST)
    finally:
        caffe.set_mode_cpu()
        os.environ.pop(GRAPHS_ENV, None)

    def forward():
        net.blobs["data"].data[...] = x
        return net.forward()[out]
    return forward, net


def _onnxruntime_cuda(onnx_file: Path, x: np.ndarray):
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ImportError("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CUDAExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})[0]


def bench(name: str, batch: int, iters: int, rounds: int, work: Path) -> dict:
    deploy, caffemodel, module = deploy_files(name, HERE / "nets" / f"{name}.prototxt", batch,
                                              None, work)
    out = module.output_names[0]
    x = np.random.default_rng(1).standard_normal(module.blob_shapes["data"], dtype=np.float32)
    cands, notes = {}, {}
    cands["pycaffe_gpu"], gpu_net = _pycaffe(deploy, caffemodel, x, out, True, True)
    cands["pycaffe_gpu_eager"], _ = _pycaffe(deploy, caffemodel, x, out, True, False)
    cands["pycaffe_cpu"], _ = _pycaffe(deploy, caffemodel, x, out, False, True)
    onnx_file = work / f"{name}.onnx"
    try:
        exporting.export(str(deploy), str(caffemodel), "onnx", str(onnx_file))
        cands["onnxruntime_cuda"] = _onnxruntime_cuda(onnx_file, x)
    except Exception as exc:  # noqa: BLE001 - a missing peer is a note, not a lost run
        notes["onnxruntime_cuda"] = str(exc).splitlines()[0][:200]
    reference = np.asarray(cands["pycaffe_cpu"]()).copy()
    diffs = {}
    for key, fn in cands.items():
        got = np.asarray(fn())
        diffs[key] = float(np.abs(got.reshape(reference.shape) - reference).max()) \
            if got.size == reference.size else float("inf")
    notes["pycaffe_gpu"] = f"graph: {gpu_net._fast.cache.graph_reason or 'replayed'}" \
        if gpu_net._fast is not None else "layer by layer (no fast path)"
    times = alternate(cands, iters, rounds)
    return {"net": name, "batch": batch, "input": list(x.shape), "notes": notes,
            "candidates": {k: {**t, "max_abs_diff": diffs[k]} for k, t in times.items()}}


def table(results: list[dict]) -> list[str]:
    cols = ["pycaffe_gpu", "pycaffe_gpu_eager", "onnxruntime_cuda", "pycaffe_cpu"]
    lines = ["| net | batch | " + " | ".join(f"{c} ms" for c in cols) +
             " | fastest peer / pycaffe_gpu | graph |", "|" + "---|" * (len(cols) + 4)]
    for r in results:
        c = r["candidates"]
        peers = [c[p]["ms"] for p in PEERS if p in c]
        ratio = f"{min(peers) / c['pycaffe_gpu']['ms']:.2f}" if peers else "no peer"
        cells = [f"{c[k]['ms']:.3f}" if k in c else "-" for k in cols]
        lines.append(f"| {r['net']} | {r['batch']} | " + " | ".join(cells) +
                     f" | {ratio} | {r['notes'].get('pycaffe_gpu', '')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "bench"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu.py: error: PyTorch sees no CUDA device (a CPU-only build or no GPU)",
              file=sys.stderr)
        return 2
    results, errors = [], []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for batch in (int(b) for b in args.batch.split(",")):
            for name in args.nets.split(","):
                print(f"gpu inference: {name} (batch {batch})", file=sys.stderr, flush=True)
                try:
                    results.append(bench(name, batch, args.iters, args.rounds, Path(tmp)))
                except Exception as exc:  # noqa: BLE001 - one broken net must not lose all
                    errors.append(f"{name} (batch {batch}): {type(exc).__name__}: {exc}")
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, " \
        f"CUDA {torch.version.cuda}"
    stem = f"{datetime.date.today().isoformat()}-gpu"
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])
    md = [f"# GPU inference, {device}", "", f"Command: `{command}`", "", *table(results), "",
          *(f"- error: {e}" for e in errors)]
    write_text(folder / f"{stem}.md", "\n".join(md) + "\n")
    write_text(folder / f"{stem}.json", json.dumps(
        {"device": device, "command": command, "results": results, "errors": errors},
        indent=1) + "\n")
    print("\n".join(md))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
