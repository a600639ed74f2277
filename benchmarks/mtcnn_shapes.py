#!/usr/bin/env python3
"""MTCNN over a folder of photos of different sizes: the input shapes change at every call.

    python benchmarks/mtcnn_shapes.py --images 8 --rounds 5 --threads 1

P-Net runs once per pyramid scale (minimum face 20 px, factor 0.709, as MTCNN's scripts
build it) of every photo; R-Net and O-Net then run once per photo on as many 24×24 / 48×48
crops as a detector would pass on (a random 5-60 here). Photos of --images different sizes,
so nearly every call brings an input shape pycaffe has not seen.

Timed, alternated, one whole folder per round (the median round is reported):
- ``pycaffe auto``: ``caffe.Net(..., engine="auto")``: a fixed-shape export for the load's
  shape and for shapes the net keeps coming back to (fast.PROMOTE_AFTER, up to
  SHAPES_KEPT), one shape-generic export for all the others (any_shape.py);
- ``pycaffe auto, torch past kept``: the same with the shape-generic step switched off
  (torch for every shape without an export of its own);
- ``pycaffe torch``: ``engine="torch"``;
- ``OpenCV DNN``: cv2.dnn reading the same prototxt and caffemodel, reshaped per call.
The first (untimed) round of each pycaffe net includes its exports and measurements; its
time is printed too. Weights are random (the speed does not depend on them); the outputs of
the pycaffe variants are checked against torch on the first round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import caffe_compat as caffe  # noqa: E402
from caffe_compat._pycaffe.any_shape import AnyShape  # noqa: E402
from caffe_compat.engine.backends.engine import EngineChoice  # noqa: E402

STAGES = {"mtcnn_pnet": None, "mtcnn_rnet": 24, "mtcnn_onet": 48}


def pyramid(height: int, width: int, min_face: int = 20, factor: float = 0.709) -> list:
    """P-Net's input sizes for one photo: scales from 12/min_face down to a 12-pixel side."""
    scale, sizes = 12.0 / min_face, []
    while min(height, width) * scale >= 12:
        sizes.append((int(np.ceil(height * scale)), int(np.ceil(width * scale))))
        scale *= factor
    return sizes


def workload(images: int, seed: int = 0) -> list[tuple[str, tuple]]:
    """(stage, input shape) of every forward over the folder, in the order MTCNN runs them."""
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(images):
        h, w = int(rng.integers(240, 480)), int(rng.integers(320, 640))
        calls += [("mtcnn_pnet", (1, 3, ph, pw)) for ph, pw in pyramid(h, w)]
        for stage in ("mtcnn_rnet", "mtcnn_onet"):
            side = STAGES[stage]
            calls.append((stage, (int(rng.integers(5, 61)), 3, side, side)))
    return calls


def _torch_past_kept(fast_forward, shapes):
    """The step switched off: every shape without an export of its own runs torch."""
    choice = EngineChoice("torch", None, "engine torch: input shapes without an export of "
                          "their own", verified=True)
    return AnyShape(choice, (), None)


def pycaffe_runner(protos: dict, weights: dict, engine: str, generic: bool):
    nets = {s: caffe.Net(protos[s], weights[s], caffe.TEST, engine=engine) for s in protos}
    if not generic:
        for net in nets.values():
            net._fast._decide_any_shape = lambda shapes, f=net._fast: _torch_past_kept(f, shapes)

    def run(stage, x):
        net = nets[stage]
        net.blobs["data"].reshape(*x.shape)
        net.reshape()
        net.blobs["data"].data[...] = x
        return net.forward()
    return run


def opencv_runner(protos: dict, weights: dict, threads: int):
    import cv2
    cv2.setNumThreads(threads)
    nets = {s: cv2.dnn.readNetFromCaffe(protos[s], weights[s]) for s in protos}

    def run(stage, x):
        nets[stage].setInput(x)
        return nets[stage].forward()
    return run


def build(workdir: Path) -> tuple[dict, dict]:
    protos, weights = {}, {}
    for stage in STAGES:
        protos[stage] = str(HERE / "nets" / f"{stage}.prototxt")
        path = workdir / f"{stage}.caffemodel"
        caffe.Net(protos[stage], caffe.TEST).save(str(path))
        weights[stage] = str(path)
    return protos, weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls = workload(args.images)
    inputs = [np.random.default_rng(i).random(s, dtype=np.float32) for i, (_, s) in
              enumerate(calls)]
    with tempfile.TemporaryDirectory() as tmp:
        protos, weights = build(Path(tmp))
        runners = {"pycaffe auto": pycaffe_runner(protos, weights, "auto", True),
                   "pycaffe auto, torch past kept": pycaffe_runner(protos, weights, "auto",
                                                                   False),
                   "pycaffe torch": pycaffe_runner(protos, weights, "torch", True),
                   "OpenCV DNN": opencv_runner(protos, weights, args.threads)}
        first, outputs = {}, {}
        for name, run in runners.items():
            t0 = time.perf_counter()
            outs = [{k: v.copy() for k, v in run(stage, x).items()}
                    if name.startswith("pycaffe") else None
                    for (stage, _), x in zip(calls, inputs)]
            first[name], outputs[name] = time.perf_counter() - t0, outs
        reference = outputs["pycaffe torch"]
        worst = max(float(np.abs(o[k] - r[k]).max()) for name in runners
                    if name.startswith("pycaffe auto")
                    for o, r in zip(outputs[name], reference) for k in r)
        times = {name: [] for name in runners}
        for r in range(args.rounds):
            order = list(runners)[r % len(runners):] + list(runners)[:r % len(runners)]
            for name in order:
                t0 = time.perf_counter()
                for (stage, _), x in zip(calls, inputs):
                    runners[name](stage, x)
                times[name].append(time.perf_counter() - t0)
    shapes = len({(s, sh) for s, sh in calls})
    print(f"{args.images} photos, {len(calls)} forwards, {shapes} distinct (net, input "
          f"shape) pairs; {args.threads} thread(s); largest difference to torch {worst:.1e}")
    print("| variant | median folder (ms) | first folder, exports included (ms) | "
          "vs pycaffe auto |")
    print("|---|---|---|---|")
    base = statistics.median(times["pycaffe auto"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med * 1e3:.1f} | {first[name] * 1e3:.0f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
