"""How well a trained net's landmark heatmaps locate the landmarks, against a trivial baseline.

For every test record (an LMDB of Datums with 3·K landmark floats in ``float_data``) the image
goes through Caffe's TEST-phase transform (centre crop to the deploy net's input side, mean
file, scale), the deploy net predicts K heatmaps (blob ``heatmaps``), and each landmark's
prediction is the argmax of its map, mapped back to input pixels. The error is the Euclidean
distance in input pixels to the target landmark, over visible landmarks only. The baseline
predicts, for every image, each landmark's mean position over the training records (same
centre crop): a branch that has learned nothing image-specific cannot beat it.

    python tools/landmark_eval.py --model models/vgg16_landmark_64/deploy.prototxt \
        --weights runs/vgg16_landmark_64/vgg16_landmark_64_iter_1000.caffemodel \
        [--test-db data/fashion50_lmdb/test] [--train-db data/fashion50_lmdb/train] \
        [--mean-file data/fashion50_lmdb/mean.binaryproto] [--scale 0.0078125] \
        [--png heatmaps.png] [--json report.json]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from caffe_compat.data.landmarks import (NAMES, heatmap_argmax,  # noqa: F401 (re-export)
                                         map_to_input, render_heatmaps)
from caffe_compat.data.transformer import TEST, DataTransformer, Draw
from caffe_compat.formats.errors import DataError


@dataclass
class Records:
    """Images C×H×W uint8 (N of them), labels (N,) and landmarks (N, K, 3) as (x, y, visible)."""
    images: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray


def read_records(db_path: str | Path) -> Records:
    """Every record of a Datum database that carries landmarks, in key order."""
    from caffe_compat.data.db import open_db
    from caffe_compat.formats.datum import decode_datum
    images, labels, marks = [], [], []
    with open_db(db_path) as db:
        for key, value in db.items():
            img, label, lm = decode_datum(value, where=f"{db_path}: record {key!r}")
            if lm is None or len(lm) == 0:
                raise DataError(f"{db_path}: record {key!r} has no landmarks in float_data "
                                "(convert_imageset --landmarks)")
            images.append(img)
            labels.append(label)
            marks.append(np.asarray(lm, dtype=np.float32).reshape(-1, 3))
    if not images:
        raise DataError(f"{db_path}: the database is empty")
    return Records(np.stack(images), np.asarray(labels), np.stack(marks))


def centre_crop(records: Records, side: int, mean_file: str | None = None,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's TEST transform of every image (float32 N×C×side×side) and the moved landmarks."""
    from caffe_compat.proto import caffe_pb2
    param = caffe_pb2.TransformationParameter(crop_size=side, scale=scale)
    if mean_file:
        param.mean_file = str(mean_file)
    transformer = DataTransformer(param, TEST, where="landmark_eval")
    _, h, w = records.images.shape[1:]
    draw = Draw(False, (h - side) // 2, (w - side) // 2)
    data = np.stack([transformer.apply(img, draw) for img in records.images])
    marks = np.stack([transformer.apply_landmarks(lm, draw, img.shape)
                      for img, lm in zip(records.images, records.landmarks)])
    return data, marks


def outside_input(landmarks: np.ndarray, input_hw) -> np.ndarray:
    """(N, K) bool: the landmark lies beyond the border of an input of size ``input_hw``."""
    h, w = input_hw
    x, y = landmarks[..., 0], landmarks[..., 1]
    return (x < 0) | (y < 0) | (x > w - 1) | (y > h - 1)


def landmark_errors(pred_xy: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(N, K) Euclidean distances of predictions to (N, K, 3) targets; NaN where invisible."""
    dist = np.linalg.norm(np.asarray(pred_xy, np.float64) - landmarks[..., :2], axis=-1)
    return np.where(landmarks[..., 2] > 0, dist, np.nan)


def mean_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(K, 2) mean (x, y) of each landmark over the records where it is visible."""
    vis = landmarks[..., 2:3] > 0
    counts = vis.sum(axis=0)
    if (counts == 0).any():
        missing = [NAMES[i] if i < len(NAMES) else str(i) for i in np.flatnonzero(counts == 0)]
        raise DataError(f"no visible training example of landmark(s) {', '.join(missing)}")
    return (np.where(vis, landmarks[..., :2], 0).sum(axis=0) / counts).astype(np.float32)


def predict_heatmaps(net, data: np.ndarray, blob: str = "heatmaps") -> np.ndarray:
    """Forward ``data`` (N×C×H×W) through a pycaffe Net in batches of its input batch size."""
    input_name = net.inputs[0]
    batch = net.blobs[input_name].data.shape[0]
    if blob not in net.blobs:
        raise DataError(f"the deploy net has no blob '{blob}' (the predicted heatmaps)")
    chunks = []
    for start in range(0, len(data), batch):
        part = data[start:start + batch]
        net.blobs[input_name].reshape(len(part), *data.shape[1:])
        net.blobs[input_name].data[...] = part
        net.forward()
        chunks.append(np.array(net.blobs[blob].data, copy=True))
    return np.concatenate(chunks)


@dataclass
class Report:
    images: int
    visible: int
    net_px: float
    baseline_px: float
    net_median_px: float
    baseline_median_px: float
    net_within_3px: float
    baseline_within_3px: float
    outside_input: float = 0.0      # fraction of visible targets outside the cropped input
    per_landmark_net_px: dict = field(default_factory=dict)
    per_landmark_baseline_px: dict = field(default_factory=dict)


def summarize(net_err: np.ndarray, base_err: np.ndarray, outside: np.ndarray | None = None
              ) -> Report:
    """Mean / median / fraction within 3 px of the net's and the baseline's (N, K) errors;
    ``outside`` (N, K bool) marks targets beyond the input's border (an argmax cannot reach
    them, so they put a floor under the error)."""
    valid = ~np.isnan(net_err)
    names = [NAMES[i] if i < len(NAMES) else str(i) for i in range(net_err.shape[1])]
    with np.errstate(invalid="ignore"):
        per_net = np.nanmean(net_err, axis=0)
        per_base = np.nanmean(base_err, axis=0)
    return Report(
        images=int(net_err.shape[0]), visible=int(valid.sum()),
        net_px=float(net_err[valid].mean()), baseline_px=float(base_err[valid].mean()),
        net_median_px=float(np.median(net_err[valid])),
        baseline_median_px=float(np.median(base_err[valid])),
        net_within_3px=float((net_err[valid] <= 3).mean()),
        baseline_within_3px=float((base_err[valid] <= 3).mean()),
        outside_input=float(outside[valid].mean()) if outside is not None else 0.0,
        per_landmark_net_px=dict(zip(names, map(float, per_net))),
        per_landmark_baseline_px=dict(zip(names, map(float, per_base))))


def format_report(report: Report) -> str:
    lines = [f"landmark error over {report.visible} visible landmarks of {report.images} "
             f"test images (input pixels):",
             f"  net (heatmap argmax):      mean {report.net_px:.2f}  median "
             f"{report.net_median_px:.2f}  within 3 px {100 * report.net_within_3px:.1f}%",
             f"  baseline (mean positions): mean {report.baseline_px:.2f}  median "
             f"{report.baseline_median_px:.2f}  within 3 px {100 * report.baseline_within_3px:.1f}%",
             "  per landmark (net / baseline): " + ", ".join(
                 f"{name} {report.per_landmark_net_px[name]:.1f}/"
                 f"{report.per_landmark_baseline_px[name]:.1f}"
                 for name in report.per_landmark_net_px),
             f"  {100 * report.outside_input:.1f}% of the visible targets lie outside the "
             "cropped input (argmax cannot reach them)"]
    return "\n".join(lines)


@dataclass
class Evaluation:
    """Everything one evaluation computed (the report, and what the figure draws)."""
    report: Report
    data: np.ndarray          # transformed test inputs N×C×H×W
    landmarks: np.ndarray     # test targets (N, K, 3) in input pixels
    heatmaps: np.ndarray      # predicted (N, K, H', W')
    pred_xy: np.ndarray       # (N, K, 2) argmax in input pixels
    baseline_xy: np.ndarray   # (K, 2)


def evaluate(net, test: Records, train: Records, mean_file: str | None, scale: float,
             blob: str = "heatmaps") -> Evaluation:
    """Run ``net`` (a pycaffe deploy Net) on ``test`` and score it against the mean of ``train``."""
    side = int(net.blobs[net.inputs[0]].data.shape[-1])
    data, targets = centre_crop(test, side, mean_file, scale)
    _, train_marks = centre_crop(train, side, mean_file, scale)
    maps = predict_heatmaps(net, data, blob)
    if maps.shape[1] != targets.shape[1]:
        raise DataError(f"blob '{blob}' has {maps.shape[1]} heatmaps but the records carry "
                        f"{targets.shape[1]} landmarks")
    pred = map_to_input(heatmap_argmax(maps), maps.shape[2:], data.shape[2:])
    baseline = mean_landmarks(train_marks)
    report = summarize(landmark_errors(pred, targets),
                       landmark_errors(np.broadcast_to(baseline, pred.shape), targets),
                       outside_input(targets, data.shape[2:]))
    return Evaluation(report, data, targets, maps, pred, baseline)


def _display_image(chw: np.ndarray) -> np.ndarray:
    """A transformed input as an H×W×3 RGB float image in [0, 1] (min-max per image)."""
    img = chw.transpose(1, 2, 0)[..., ::-1] if chw.shape[0] == 3 else chw[0][..., None]
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _normalised_max(maps: np.ndarray) -> np.ndarray:
    """The per-pixel max over a K×H×W stack, scaled to [0, 1] for display."""
    top = maps.max(axis=0)
    return (top - top.min()) / max(float(top.max() - top.min()), 1e-12)


def write_figure(ev: Evaluation, path: str | Path, count: int = 4, title: str = "") -> Path:
    """Rows of (input with target ○ and predicted × landmarks, predicted, target heatmaps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from caffe_compat.formats.atomic import save_figure
    count = min(count, len(ev.data))
    picks = np.linspace(0, len(ev.data) - 1, count).round().astype(int)
    h, w = ev.heatmaps.shape[2:]
    targets = render_heatmaps(ev.landmarks[picks] * [w / ev.data.shape[3], h / ev.data.shape[2], 1],
                              h, w).numpy()
    fig, axes = plt.subplots(count, 3, figsize=(6.6, 2.2 * count), squeeze=False)
    for row, i in enumerate(picks):
        vis = ev.landmarks[i, :, 2] > 0
        ax = axes[row, 0]
        ax.imshow(_display_image(ev.data[i]))
        ax.scatter(ev.landmarks[i, vis, 0], ev.landmarks[i, vis, 1], s=30, facecolors="none",
                   edgecolors="lime", linewidths=1.2, label="target")
        ax.scatter(ev.pred_xy[i, vis, 0], ev.pred_xy[i, vis, 1], s=30, c="red", marker="x",
                   linewidths=1.2, label="predicted (argmax)")
        axes[row, 1].imshow(_normalised_max(ev.heatmaps[i]), cmap="magma")
        axes[row, 2].imshow(_normalised_max(targets[row]), cmap="magma")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"test #{i}", fontsize=8)
    axes[0, 0].set_title("input: target ○, predicted ×", fontsize=8)
    axes[0, 1].set_title("predicted heatmaps (max of K)", fontsize=8)
    axes[0, 2].set_title("target heatmaps (max of K)", fontsize=8)
    r = ev.report
    fig.suptitle(f"{title}\nerror {r.net_px:.2f} px (mean-position baseline "
                 f"{r.baseline_px:.2f} px)".strip(), fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=80)
    plt.close(fig)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="models/vgg16_landmark_64/deploy.prototxt",
                    help="the deploy prototxt (default: %(default)s)")
    ap.add_argument("--weights", required=True, help="the trained .caffemodel")
    ap.add_argument("--test-db", default="data/fashion50_lmdb/test",
                    help="test records with landmarks (default: %(default)s)")
    ap.add_argument("--train-db", default="data/fashion50_lmdb/train",
                    help="training records, for the mean-position baseline (default: %(default)s)")
    ap.add_argument("--mean-file", default="data/fashion50_lmdb/mean.binaryproto",
                    help="the mean image the net was trained with ('' for none)")
    ap.add_argument("--scale", type=float, default=0.0078125,
                    help="transform_param scale of the training net (default: %(default)s)")
    ap.add_argument("--blob", default="heatmaps", help="the heatmap blob (default: %(default)s)")
    ap.add_argument("--png", help="write predicted vs target heatmaps of a few test images here")
    ap.add_argument("--count", type=int, default=4, help="test images in the PNG (default 4)")
    ap.add_argument("--title", help="the PNG's title (default: the weights' file name)")
    ap.add_argument("--json", help="also write the report as JSON here")


def evaluate_command(args: argparse.Namespace) -> int:
    from caffe_compat import pycaffe
    from caffe_compat.formats.atomic import write_text
    for path, what in ((args.model, "--model"), (args.weights, "--weights")):
        if not Path(path).is_file():
            raise DataError(f"{path}: {what} file does not exist")
    net = pycaffe.Net(args.model, pycaffe.TEST, weights=args.weights)
    ev = evaluate(net, read_records(args.test_db), read_records(args.train_db),
                  args.mean_file or None, args.scale, args.blob)
    print(format_report(ev.report))
    if args.png:
        title = args.title or Path(args.weights).name
        print(f"wrote {write_figure(ev, args.png, args.count, title)}")
    if args.json:
        write_text(args.json, json.dumps(asdict(ev.report), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from caffe_compat.commands.common import add_debug_flag, run
    ap = argparse.ArgumentParser(prog="landmark_eval.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    add_debug_flag(ap)
    return run(evaluate_command, ap.parse_args(argv), "landmark_eval.py")
