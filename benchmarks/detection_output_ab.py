"""DetectionOutput before/after on the SSD benchmark net, alternated in one process.

    python benchmarks/detection_output_ab.py --baseline 2cd6a9c --batch 1,16 --engine auto

Loads ``caffe_compat/engine/layers/ssd_detection.py`` as it was at ``--baseline`` (git show)
next to the current one, builds ``benchmarks/nets/ssd_face.prototxt`` once (random weights:
every prior scores about 0.5, so ``top_k`` = 400 candidates reach NMS, the worst case of
this head), builds it once with each DetectionOutput (same weights), and alternates the two nets round by round, timing
the layer alone on the net's own bottoms and the whole ``net.forward()``. Prints medians
(ms) and checks that both implementations give the same detections bit for bit.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import ssd_detection
from caffe_compat.engine.layers.base import _REGISTRY

HERE = Path(__file__).resolve().parent
LAYER_FILE = "caffe_compat/engine/layers/ssd_detection.py"


def baseline_class(revision: str) -> type:
    """The DetectionOutput class of ``revision``, defined without registering it."""
    source = subprocess.run(["git", "show", f"{revision}:{LAYER_FILE}"], cwd=HERE.parent,
                            check=True, capture_output=True, text=True).stdout
    namespace = {"__name__": "detection_output_baseline"}
    exec(compile(source.replace("@register\n", ""), f"{revision}:{LAYER_FILE}", "exec"),
         namespace)
    return namespace["DetectionOutput"]


def median_ms(run, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--baseline", required=True, help="git revision of the old layer")
    args.add_argument("--batch", default="1,16")
    args.add_argument("--engine", default="auto")
    args.add_argument("--rounds", type=int, default=7)
    args.add_argument("--iters", type=int, default=5)
    opts = args.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same random weights run to run
    np.random.seed(0)
    classes = {"before": baseline_class(opts.baseline), "after": ssd_detection.DetectionOutput}
    print(f"load average {os.getloadavg()[0]:.2f}, 1 thread, torch {torch.__version__}")
    weights = Path(tempfile.mkdtemp()) / "ssd_face.caffemodel"
    for batch in (int(b) for b in opts.batch.split(",")):
        nets, layers, bottoms = {}, {}, None
        for name, cls in classes.items():
            # The second net runs on the engine the first chose, so only the head differs.
            engine = nets["before"].engine if nets else opts.engine
            nets[name] = build(cls, engine, batch, weights)
            layers[name] = next(o for o in gc.get_objects() if type(o) is cls)
            nets[name].forward()
            bottoms = bottoms or [torch.from_numpy(nets[name].blobs[b].data.copy())
                                  for b in ("mbox_loc", "mbox_conf_flatten", "mbox_priorbox")]
        layer_ms, net_ms = {k: [] for k in classes}, {k: [] for k in classes}
        for _ in range(opts.rounds):
            for name in classes:
                layer_ms[name].append(median_ms(lambda: layers[name].forward(*bottoms),
                                                opts.iters))
                net_ms[name].append(median_ms(nets[name].forward, opts.iters))
        outputs = {k: layer.forward(*bottoms).numpy() for k, layer in layers.items()}
        same = np.array_equal(outputs["before"], outputs["after"])
        print(f"batch {batch}: {len(outputs['after'][0, 0])} detections, identical on the "
              f"same bottoms: {same}")
        for name in classes:
            print(f"  {name:6s} DetectionOutput {statistics.median(layer_ms[name]):8.2f} ms   "
                  f"net.forward {statistics.median(net_ms[name]):8.2f} ms "
                  f"({nets[name].engine})")


def build(cls: type, engine: str, batch: int, weights: Path):
    """The benchmark net with ``cls`` as its DetectionOutput, its input at ``batch``; the
    first net built saves its weights and later ones load them."""
    registered = _REGISTRY["DetectionOutput"]
    _REGISTRY["DetectionOutput"] = cls
    try:
        proto = str(HERE / "nets" / "ssd_face.prototxt")
        net = (caffe.Net(proto, caffe.TEST, weights=str(weights), engine=engine)
               if weights.exists() else caffe.Net(proto, caffe.TEST, engine=engine))
    finally:
        _REGISTRY["DetectionOutput"] = registered
    if not weights.exists():
        net.save(str(weights))
    net.blobs["data"].reshape(batch, 3, 240, 320)
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(0).random((batch, 3, 240, 320))
    return net


if __name__ == "__main__":
    main()
