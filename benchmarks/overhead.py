#!/usr/bin/env python3
"""Where a small net's batch-1 forward goes: the executor, each step, and torch's fixed
per-call costs.

    python benchmarks/overhead.py [--nets lenet,mtcnn_rnet,mtcnn_onet,ultraface_slim]
                                  [--forwards 300] [--out results/bench/overhead.md]

For each net of benchmarks/nets (random weights, BatchNorm statistics as after training) the
fused channels-last inference net with measured convolution forms (what pycaffe's forward
runs on the torch engine) is timed whole, and step by step in sequence (a copy of the
executor's loop with a clock read around each call; the fastest of ``--forwards``, which on
a loaded machine is the run without preemptions), and with every step's arithmetic removed
(the executor's own cost). Each step's number of aten calls comes
from one profiled forward (counts only: the profiler's times are inflated). The floor of a
call on this machine -- an empty Python function, a 1-element aten op, F.conv2d / F.linear /
max_pool2d on 1-element tensors -- says what a step costs besides its arithmetic.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from caffe_compat.engine.net.fuse import fused_for_inference  # noqa: E402
from caffe_compat.engine.net.module import build_net  # noqa: E402
from caffe_compat.engine.net.plan import execute  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402
from suite.inference import deploy_param, randomize_statistics  # noqa: E402


class StepRanges:
    """Executor hooks opening a profiler range per step (to count its aten calls)."""

    def __init__(self):
        self.open = None

    def before(self, step, args):
        self.open = torch.profiler.record_function(f"step:{step.name}")
        self.open.__enter__()
        return args

    def after(self, step, args, outs):
        self.open.__exit__(None, None, None)


def median_us(fn, calls: int, fastest: bool = False) -> float:
    """Median (or with ``fastest``, least) µs per call."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return (min(times) if fastest else statistics.median(times)) * 1e6


def step_times(fused, x, forwards: int) -> dict[str, float]:
    """Least µs of each step's call, run in sequence as the executor runs them (on a loaded
    machine the least is the call without preemptions; a median of a long forward is not)."""
    times = defaultdict(list)
    for _ in range(forwards):
        blobs = {fused.input_names[0]: x}
        for step in fused.plan:
            args = [blobs[b] for b in step.bottoms]
            start = time.perf_counter()
            outs = tuple(args) * len(step.tops) if step.call is None else step.call(*args)
            times[step.name].append(time.perf_counter() - start)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            blobs.update(zip(step.tops, outs))
    return {name: min(t) * 1e6 for name, t in times.items()}


def executor_alone(fused, x, forwards: int) -> float:
    """µs of ``fused``'s forward when every step returns its output at once (no arithmetic):
    the executor, the FusedNet's call wrapper and the flush-to-zero switch."""
    blobs = execute(fused.plan, {fused.input_names[0]: x}, keep_all=True)
    plan = [copy.copy(step) for step in fused.plan]
    for step in plan:
        if step.call is not None:
            made = tuple(blobs[t] for t in step.tops)
            step.call = (lambda *args, made=made[0] if len(made) == 1 else made: made)
    empty = copy.copy(fused)
    empty.plan = plan
    return median_us(lambda: empty(x), forwards)


def aten_calls(fused, x) -> dict[str, int]:
    hooks = StepRanges()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        execute(fused.plan, {fused.input_names[0]: x}, keep_all=False, hooks=hooks)
    return {e.name[5:]: len(e.cpu_children) for e in prof.events() if e.name.startswith("step:")}


def floors(calls: int) -> dict[str, float]:
    """µs of calls that do next to no arithmetic."""
    one = torch.ones(1, 1, 1, 1)
    w, v = torch.ones(1, 1, 1, 1), torch.ones(1, 1)
    return {"empty Python call": median_us(lambda: None, calls),
            "aten add (1 element)": median_us(lambda: torch.add(one, one), calls),
            "F.conv2d (1 element)": median_us(lambda: F.conv2d(one, w), calls),
            "F.linear (1 element)": median_us(lambda: F.linear(v, v), calls),
            "F.max_pool2d (1 element)": median_us(lambda: F.max_pool2d(one, 1), calls)}


def profile(name: str, forwards: int) -> tuple[float, float, list[tuple[str, str, float, int]]]:
    torch.manual_seed(0)
    net = build_net(deploy_param(HERE / "nets" / f"{name}.prototxt", 1, None), caffe_pb2.TEST,
                    source=name).eval()
    randomize_statistics(net)
    fused = fused_for_inference(net, channels_last=True, measure=True)
    x = torch.randn(*net.blob_shapes["data"]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        wall = median_us(lambda: fused(x), forwards, fastest=True)
        per_step = step_times(fused, x, forwards)
        alone = executor_alone(fused, x, forwards)
        counts = aten_calls(fused, x)
    rows = []
    for step in fused.plan:
        kind = type(step.fn).__name__ if step.fn is not None else "alias"
        form = getattr(step.fn, "_form", None)
        if form is not None:
            kind += f" ({form[3]})"
        rows.append((step.name, kind, per_step[step.name], counts.get(step.name, 0)))
    return wall, alone, rows


def as_before(fused):
    """``fused`` (unmeasured) as the code before this change ran it: IEEE subnormals, and
    a narrow softmax through torch's own kernel."""
    fused.flush_denormals = False
    for step in fused.plan:
        if getattr(step.call, "__qualname__", "").startswith("_softmax_moved"):
            step.call = step.fn.forward
    return fused


def compare(name: str, forwards: int, rounds: int, work: Path) -> dict[str, float]:
    """Median µs per forward, best of ``rounds`` alternating: the fused channels-last net as
    before this change (direct convolutions, IEEE subnormals) and as now (measured forms,
    flush-to-zero), and pycaffe's net.forward() on the torch engine with each inside."""
    from caffe_compat import pycaffe
    from caffe_compat.engine import weights as weights_io
    from suite.timing import alternate
    torch.manual_seed(0)
    param = deploy_param(HERE / "nets" / f"{name}.prototxt", 1, None)
    (work / f"{name}.prototxt").write_text(str(param))
    net = build_net(param, caffe_pb2.TEST, source=name).eval()
    randomize_statistics(net)
    weights_io.save(net, str(work / f"{name}.caffemodel"))
    x = torch.randn(*net.blob_shapes["data"])
    before = as_before(fused_for_inference(net, channels_last=True))
    after = fused_for_inference(net, channels_last=True, measure=True)
    nets = {}
    for key in ("pycaffe before", "pycaffe after"):
        nets[key] = pycaffe.Net(str(work / f"{name}.prototxt"),
                                str(work / f"{name}.caffemodel"), pycaffe.TEST)
        nets[key].forward(data=x.numpy())
    cache = nets["pycaffe before"]._fast.cache
    cache._fused = as_before(fused_for_inference(cache.module, channels_last=True))

    def forward(pnet):
        pnet.blobs["data"].data[...] = x.numpy()
        return pnet.forward()
    with torch.no_grad():
        times = alternate({"torch before": lambda: before(x), "torch after": lambda: after(x),
                           **{k: (lambda n=n: forward(n)) for k, n in nets.items()}},
                          forwards, rounds)
    return {k: v["ms"] * 1000 for k, v in times.items()}


def report(nets: list[str], forwards: int) -> str:
    lines = [f"# Batch-1 forward: where the time goes ({time.strftime('%Y-%m-%d %H:%M')})",
             "", f"Command: `python benchmarks/overhead.py --nets {','.join(nets)} --forwards "
             f"{forwards}`; 1 thread, torch {torch.__version__}; load average "
             f"{tuple(round(v, 1) for v in os.getloadavg())} at the start (shared machine).",
             "", "Floors (µs per call): " + ", ".join(
                 f"{k} {v:.2f}" for k, v in floors(forwards * 5).items()), ""]
    for name in nets:
        wall, alone, rows = profile(name, forwards)
        steps = sum(r[2] for r in rows)
        lines += [f"## {name}: fastest forward {wall:.0f} µs; its steps {steps:.0f} µs "
                  f"(fastest of each); the executor with every step's arithmetic removed "
                  f"{alone:.1f} µs (median); {sum(r[3] for r in rows)} aten calls",
                  "", "| step | op (form) | µs | aten calls |", "|---|---|---|---|"]
        lines += [f"| {n} | {k} | {t:.1f} | {c} |" for n, k, t, c in rows]
        lines.append("")
    lines += ["## Before and after (µs per forward, median of the best of 5 alternating rounds)",
              "", "| net | torch before | torch after | pycaffe before | pycaffe after |",
              "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as work:
        for name in nets:
            t = compare(name, forwards, 5, Path(work))
            lines.append(f"| {name} | {t['torch before']:.0f} | {t['torch after']:.0f} | "
                         f"{t['pycaffe before']:.0f} | {t['pycaffe after']:.0f} |")
    lines += ["", "torch: the fused channels-last net called directly; before = direct "
              "convolutions, a narrow softmax through torch's kernel and IEEE subnormals (what "
              "main ran before this change), after = measured forms, the moved softmax and "
              "flush-to-zero. pycaffe: net.forward() on the torch engine with each inside.", ""]
    lines.append(f"Load average at the end: {tuple(round(v, 1) for v in os.getloadavg())}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="lenet,mtcnn_rnet,mtcnn_onet,ultraface_slim")
    ap.add_argument("--forwards", type=int, default=200)
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = report(args.nets.split(","), args.forwards)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
