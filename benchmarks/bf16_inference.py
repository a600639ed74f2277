#!/usr/bin/env python3
"""pycaffe with ``engine="auto", precision="auto"`` against the peers in fp32 and in bf16.

    python benchmarks/bf16_inference.py --nets resnet50,mtcnn_onet --batch 1 --threads 1

Per net and batch, alternated in one process (suite/timing.py), the suite's nets and weights
(suite/inference.py): pycaffe's ``net.forward()`` (the input written into its blob first)
with ``engine="auto"`` in fp32 and with ``precision="auto"`` too (which engine each chose is
printed), OpenVINO on ``tools/export.py``'s ONNX file with the f32 and with the bf16 precision
hint, onnxruntime and OpenCV DNN (fp32). Each output's largest difference from the fp32
module, relative to max(1, its largest magnitude), is in the JSON. On a CPU without native
bf16 OpenVINO's bf16 hint falls back to f32 (the table says which precision it ran) and
``precision="auto"`` keeps fp32. Writes results/bench/<stem>.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from caffe_compat import pycaffe  # noqa: E402
from caffe_compat.commands import export as exporting  # noqa: E402
from caffe_compat.engine.layers.base import TEST  # noqa: E402
from caffe_compat.formats.atomic import write_text  # noqa: E402
from suite.inference import (_onnx_runner, _opencv_runner, _openvino_runner,  # noqa: E402
                             deploy_files)
from suite.machine import describe  # noqa: E402
from suite.timing import alternate  # noqa: E402

COLUMNS = ("pycaffe fp32", "pycaffe auto", "openvino f32", "openvino bf16", "onnxruntime",
           "opencv")
REDUCED_PEERS = ("openvino bf16",)
FP32_PEERS = ("openvino f32", "onnxruntime", "opencv")


def _pycaffe(deploy: Path, weights: Path, x: np.ndarray, out: str, precision: str):
    net = pycaffe.Net(str(deploy), str(weights), TEST, engine="auto", precision=precision)

    def forward():
        net.blobs["data"].data[...] = x
        return net.forward()[out]
    forward()                                   # the first call checks the chosen engine
    return forward, net.engine


def bench(name: str, batch: int, threads: int, iters: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bf16-{name}-") as tmp:
        work = Path(tmp)
        deploy, weights, module = deploy_files(name, HERE / "nets" / f"{name}.prototxt", batch,
                                               None, work)
        out = module.output_names[0]
        x = torch.randn(*module.blob_shapes["data"],
                        generator=torch.Generator().manual_seed(1)).numpy()
        with torch.no_grad():
            ref = module(data=torch.from_numpy(x))[out].numpy()
        onnx = work / f"{name}.onnx"
        exporting.export(str(deploy), str(weights), "onnx", str(onnx))
        calls, notes = {}, {}
        for precision, column in (("fp32", "pycaffe fp32"), ("auto", "pycaffe auto")):
            calls[column], notes[column] = _pycaffe(deploy, weights, x, out, precision)
        for hint in ("f32", "bf16"):
            run = calls[f"openvino {hint}"] = _openvino_runner(onnx, x, threads, hint)
            notes[f"openvino {hint}"] = run.precision
        calls["onnxruntime"] = _onnx_runner(onnx, x, threads)
        calls["opencv"] = _opencv_runner(deploy, weights, x, threads, out)
        diffs = {k: float(np.abs(np.asarray(fn()).reshape(ref.shape) - ref).max()
                          / max(1.0, float(np.abs(ref).max()))) for k, fn in calls.items()}
        times = alternate(calls, iters, rounds)
    return {"net": name, "batch": batch, "ms": {k: t["ms"] for k, t in times.items()},
            "rounds_ms": {k: t["rounds_ms"] for k, t in times.items()},
            "relative_difference": diffs, "notes": notes}


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| net (batch) | " + " | ".join(COLUMNS) + " | fastest bf16 peer / pycaffe auto "
             "| fastest fp32 peer / pycaffe auto | pycaffe auto / fp32 |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for r in rows:
        ms, notes = r["ms"], r["notes"]
        cells = [f"{_ms(ms[c])} ({notes[c]})" if c in notes else _ms(ms[c]) for c in COLUMNS]
        auto = ms["pycaffe auto"]
        bf16 = min(ms[c] for c in REDUCED_PEERS)
        fp32 = min(ms[c] for c in FP32_PEERS)
        lines.append(f"| {r['net']} ({r['batch']}) | " + " | ".join(cells) +
                     f" | {bf16 / auto:.2f}x | {fp32 / auto:.2f}x | "
                     f"{auto / ms['pycaffe fp32']:.2f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="lenet,mtcnn_rnet,mtcnn_onet,ultraface_slim,"
                                      "squeezenet1_1,mobilenet_v1,resnet50")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "bench"))
    ap.add_argument("--stem", default="bf16-inference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe()
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for name in args.nets.split(","):
            print(f"{name} (batch {batch})", file=sys.stderr, flush=True)
            rows.append(bench(name, batch, args.threads, args.iters, args.rounds))
    command = "python benchmarks/bf16_inference.py " + " ".join(sys.argv[1:])
    text = "\n".join([f"# bf16 inference: {args.stem}", "",
                      f"Machine: {machine['cpu']} ({machine['vendor']} family "
                      f"{machine['family']} model {machine['model']}), flags "
                      f"{', '.join(machine['flags'])}; torch {machine['torch']}, "
                      f"{args.threads} thread(s); load average {machine['load_average_start']}"
                      " at the start.", "", f"Command: `{command}`", "",
                      "ms per forward (median of the best round); in brackets the engine "
                      "pycaffe chose, or the precision OpenVINO compiled.", "", *table(rows),
                      ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{args.stem}.md", text)
    write_text(out / f"{args.stem}.json", json.dumps({"machine": machine, "command": command,
                                                      "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
