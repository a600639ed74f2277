#!/usr/bin/env python3
"""Where the time of pycaffe's ``net.forward()`` goes when an engine runs the net.

    python benchmarks/engine_overhead.py --nets lenet,mtcnn_rnet --batch 1 --threads 1

Per net, batch and engine (onnxruntime, openvino): the peer (the benchmark suite's own
runtime call on the ONNX file tools/export.py writes: ``session.run`` / ``request.infer``),
pycaffe's ``forward()`` as the suite times it (the input written into its blob, then
``forward()``), and the parts of that forward timed one at a time on the same objects: the
bound runtime call alone, the engine plan through the executor, the copy of the inputs into
the runtime's buffers, the copy of the outputs into their blobs, the weights check and the
rest. Medians of single calls, the candidates alternated, microseconds. Prints a markdown
table (and --json writes the rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from caffe_compat import pycaffe  # noqa: E402
from caffe_compat.engine.layers.base import TEST  # noqa: E402
from suite.inference import build_candidates  # noqa: E402

SKIP = {"fused_cl_direct", "torchscript", "frozen", "fused", "module", "opencv", "pycaffe",
        "fused_cl"}


def medians(calls: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median microseconds of single calls, the calls alternated in rounds."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}


def parts(net, x: np.ndarray) -> dict:
    """The pieces of one engine forward, each callable alone."""
    fast = net._fast
    plan = fast.choice.forward
    state = net.blob_state
    host = net.blobs["data"].data
    params = fast.cache.parameters()
    outputs = plan.run(plan.inputs)

    def weights_check():
        ps = fast.cache.parameters()
        touched, _ = fast._numpy_state(ps)
        return fast._weights_key(ps, touched)

    def suite_forward():
        host[...] = x
        return net.forward()
    return {
        "suite pycaffe": suite_forward,
        "forward()": net.forward,
        "runtime": plan.call.runner.run,
        "plan via execute": lambda: plan.run(plan.inputs),
        "input copy": lambda: [np.copyto(b, state.get(n)) for n, b in plan.input_arrays.items()],
        "output copy": lambda: ([state.put(n, outputs[n]) for n in fast._copied],
                                state.written(fast._direct)),
        "weights check": weights_check,
        "stale marking": lambda: state.mark_stale(fast._skipped, fast.run),
        "params": lambda: params,
    }


def measure(name: str, batch: int, engine: str, rounds: int, iters: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"overhead-{name}-"))
    cands, _, module = build_candidates(name, HERE / "nets" / f"{name}.prototxt", batch,
                                        None, work, SKIP, None)
    net = pycaffe.Net(str(work / f"{name}.prototxt"), str(work / f"{name}.caffemodel"), TEST,
                      engine=engine)
    x = torch.randn(*module.blob_shapes["data"]).numpy()
    net.blobs["data"].data[...] = x
    net.forward()
    row = {"net": name, "batch": batch, "engine": net.engine}
    calls = {"peer": cands[engine]} if engine in cands else {}
    if net.engine == engine:
        calls.update(parts(net, x))
        calls.pop("params")
    row.update(medians(calls, rounds, iters))
    return row


def table(rows: list[dict]) -> list[str]:
    keys = ["peer", "suite pycaffe", "forward()", "runtime", "plan via execute", "input copy",
            "output copy", "weights check", "stale marking"]
    lines = ["| net (batch) | engine | " + " | ".join(keys) + " | suite pycaffe / peer |",
             "|---|---|" + "---|" * (len(keys) + 1)]
    for r in rows:
        ratio = r["suite pycaffe"] / r["peer"] if r.get("peer") and r.get("suite pycaffe") \
            else None
        lines.append(f"| {r['net']} ({r['batch']}) | {r['engine']} | " +
                     " | ".join(str(r.get(k, "")) for k in keys) +
                     f" | {'' if ratio is None else f'{ratio:.3f}'} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="lenet,mtcnn_rnet,mtcnn_onet,ultraface_slim")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--engines", default="onnxruntime,openvino")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.nets.split(","):
        for batch in map(int, args.batch.split(",")):
            for engine in args.engines.split(","):
                rows.append(measure(name, batch, engine, args.rounds, args.iters))
                print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
