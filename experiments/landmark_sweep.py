"""Short training runs of vgg16_landmark_64 variants: does the landmark branch learn?

Each variant is the model's train_val.prototxt with a few edits (loss type, loss_weight,
σ, target scale, lr_mult of the branch); it trains for ``--iterations`` with the model's
solver (same seed, same data), then its TEST net is scored at the end: accuracy,
landmark_loss and the landmark error in pixels (argmax of each heatmap vs the target, visible
landmarks only) against the mean-training-position baseline of experiments/landmark_eval.py.
One JSON line per variant is appended to ``<out>/sweep.jsonl``.

    python -m experiments.landmark_sweep --variants baseline,lw0.02,sce --iterations 300 \
        --threads 1 --out runs/landmark_sweep
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from experiments import landmark_eval as le

MODEL = Path("models/vgg16_landmark_64")
TRANSFORM = dict(mean_file="data/fashion50_lmdb/mean.binaryproto", scale=0.0078125)


def _layer(net, name):
    for layer in net.layer:
        if layer.name == name:
            return layer
    raise KeyError(f"no layer '{name}' in {net.name}")


def set_loss_weight(net, weight: float) -> None:
    _layer(net, "landmark_loss").loss_weight[:] = [weight]


def set_sigma(net, sigma: float) -> None:
    _layer(net, "lm_target").landmark_heatmap_param.sigma = sigma


def scale_targets(net, factor: float) -> None:
    """Targets with peak ``factor`` (a Power layer after the renderer)."""
    from caffe_compat.proto import caffe_pb2
    power = caffe_pb2.LayerParameter(name="lm_target_scale", type="Power",
                                     bottom=["heatmap_target"], top=["heatmap_target_scaled"])
    power.power_param.scale = factor
    index = list(net.layer).index(_layer(net, "lm_target"))
    net.layer.insert(index + 1, power)
    _layer(net, "landmark_loss").bottom[1] = "heatmap_target_scaled"


def sigmoid_cross_entropy(net, bias: float) -> None:
    """Per-pixel sigmoid cross-entropy; heatmaps are logits (bias ``bias`` at the start) and
    the attention reads their sigmoid, so it sees maps in [0, 1] as with Euclidean targets."""
    from caffe_compat.proto import caffe_pb2
    _layer(net, "landmark_loss").type = "SigmoidCrossEntropyLoss"
    head = _layer(net, "lm_heatmap")
    head.convolution_param.bias_filler.value = bias
    prob = caffe_pb2.LayerParameter(name="lm_prob", type="Sigmoid", bottom=["heatmaps"],
                                    top=["heatmap_prob"])
    index = list(net.layer).index(_layer(net, "att_conv"))
    net.layer.insert(index, prob)
    _layer(net, "att_conv").bottom[0] = "heatmap_prob"


def spatial_softmax(net, weight: float) -> None:
    """Each heatmap as a distribution over its pixels: cross-entropy between softmax(heatmap)
    and the target map divided by 2πσ² (an interior Gaussian's mass, so ~1), summed over the
    K maps, averaged over the batch. Built from standard layers: Reshape, Softmax, Log,
    Power, Eltwise PROD and a Reduction SUM that carries the loss_weight."""
    from caffe_compat.proto import caffe_pb2
    old = _layer(net, "landmark_loss")
    target = _layer(net, "lm_target").landmark_heatmap_param
    side = max(target.height, target.width)
    sigma = target.sigma or side / 32.0
    batch = next(l.data_param.batch_size for l in net.layer if l.type == "Data")
    index = list(net.layer).index(old)
    del net.layer[index]

    def add(name, type_, bottoms, top):
        layer = caffe_pb2.LayerParameter(name=name, type=type_, bottom=bottoms, top=[top])
        net.layer.insert(index + add.count, layer)    # inserts a copy: edit the stored one
        add.count += 1
        return net.layer[index + add.count - 1]
    add.count = 0
    for blob in ("heatmaps", "heatmap_target"):
        r = add(f"{blob}_flat", "Reshape", [blob], f"{blob}_flat")
        r.reshape_param.shape.dim.extend([0, 0, -1])
    add("lm_softmax", "Softmax", ["heatmaps_flat"], "lm_prob").softmax_param.axis = 2
    # shift keeps log finite where the softmax underflows (the target is ~0 there)
    add("lm_logp", "Log", ["lm_prob"], "lm_logp").log_param.shift = 1e-30
    norm = add("lm_target_norm", "Power", ["heatmap_target_flat"], "lm_target_norm")
    norm.power_param.scale = 1.0 / (2 * np.pi * sigma ** 2)
    add("lm_ce", "Eltwise", ["lm_logp", "lm_target_norm"], "lm_ce").eltwise_param.operation = 0
    loss = add("landmark_loss", "Reduction", ["lm_ce"], "landmark_loss")
    loss.reduction_param.axis = 0
    loss.reduction_param.coeff = -1.0 / batch
    loss.loss_weight.append(weight)


def branch_lr(net, factor: float) -> None:
    """Multiply the lr_mult of every learnable landmark-branch layer (lm_*) by ``factor``."""
    for layer in net.layer:
        if layer.name.startswith("lm_"):
            for p in layer.param:
                p.lr_mult *= factor


def variant_edits(name: str):
    """Edits for a variant name: '+'-joined parts like lw0.02, sigma4, scale10, sce-4, lr5."""
    edits = []
    for part in name.split("+"):
        if part == "baseline":
            continue
        for prefix, fn in (("lw", set_loss_weight), ("sigma", set_sigma),
                           ("scale", scale_targets), ("sce", sigmoid_cross_entropy),
                           ("lr", branch_lr), ("ssm", spatial_softmax)):
            if part.startswith(prefix):
                edits.append((fn, float(part[len(prefix):])))
                break
        else:
            raise ValueError(f"unknown variant part '{part}'")
    return edits


def build_variant(name: str, out: Path, iterations: int, test_interval: int):
    """Write the variant's train_val and solver under ``out/name``; returns the solver path."""
    from caffe_compat.formats.blob_io import read_text_proto
    from caffe_compat.formats.atomic import write_text
    from caffe_compat.proto import caffe_pb2
    from google.protobuf import text_format
    net = read_text_proto(MODEL / "train_val.prototxt", caffe_pb2.NetParameter())
    for fn, value in variant_edits(name):
        fn(net, value)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "train_val.prototxt", text_format.MessageToString(net))
    solver = read_text_proto(MODEL / "solver.prototxt", caffe_pb2.SolverParameter())
    solver.net = str(folder / "train_val.prototxt")
    solver.max_iter = solver.snapshot = iterations
    solver.test_interval = test_interval
    solver.display = test_interval
    solver.snapshot_prefix = str(folder / "snap")
    write_text(folder / "solver.prototxt", text_format.MessageToString(solver))
    return folder / "solver.prototxt"


def score(train_val: Path, weights: Path, batches: int = 5) -> dict:
    """Accuracy, landmark_loss and pixel errors of the TEST net over ``batches`` batches."""
    from caffe_compat import pycaffe
    net = pycaffe.Net(str(train_val), pycaffe.TEST, weights=str(weights))
    maps, marks, acc, lml = [], [], [], []
    for _ in range(batches):
        out = net.forward()
        acc.append(float(out["accuracy"]))
        lml.append(float(out["landmark_loss"]))
        maps.append(np.array(net.blobs["heatmaps"].data))
        marks.append(np.array(net.blobs["landmarks"].data))
    maps, marks = np.concatenate(maps), np.concatenate(marks)
    pred = le.map_to_input(le.heatmap_argmax(maps), maps.shape[2:], maps.shape[2:])
    _, train_marks = le.centre_crop(le.read_records("data/fashion50_lmdb/train"),
                                    maps.shape[-1], **TRANSFORM)
    base = le.mean_landmarks(train_marks)
    report = le.summarize(le.landmark_errors(pred, marks),
                          le.landmark_errors(np.broadcast_to(base, pred.shape), marks))
    return {"accuracy": float(np.mean(acc)), "landmark_loss": float(np.mean(lml)),
            "error_px": report.net_px, "baseline_px": report.baseline_px,
            "within_3px": report.net_within_3px}


def run_variant(name: str, out: Path, iterations: int, test_interval: int) -> dict:
    from caffe_compat.engine.solver.base import Solver
    from caffe_compat.engine.solver.events import TestDone
    solver_path = build_variant(name, out, iterations, test_interval)
    curve = []
    solver = Solver(str(solver_path))
    solver.subscribe(lambda e: curve.append(
        (e.iter, e.scalar("accuracy"), e.scalar("landmark_loss"))), TestDone)
    start = time.time()
    solver.solve()
    solver.close()
    weights = out / name / f"snap_iter_{iterations}.caffemodel"
    result = {"variant": name, "iterations": iterations, "seconds": round(time.time() - start),
              **score(out / name / "train_val.prototxt", weights), "curve": curve}
    with open(out / "sweep.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="baseline", help="comma-separated variant names")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--test-interval", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/landmark_sweep")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        r = run_variant(name, out, args.iterations, args.test_interval)
        print(f"{name}: acc {r['accuracy']:.3f}  landmark_loss {r['landmark_loss']:.3f}  "
              f"error {r['error_px']:.2f} px (baseline {r['baseline_px']:.2f})  "
              f"{r['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
