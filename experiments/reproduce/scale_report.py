"""The full Fashion-MNIST benchmark's report (tools/full_fashion_mnist.py): markdown and a plot.

``markdown`` turns the script's result dict into ``results/fmnist_full.md``; ``plot`` draws
the train loss and the test accuracy against epochs, with the target and the published
VGG16 figure as lines, into the PNG beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.reproduce.plots import _pyplot, _save
from experiments.reproduce import oversample, snapshot_check

ANCHORS = "VGG16 93.5%, ResNet-18 94.9%, DenseNet-BC 95.4%, WRN-40-4 96.7%"
VGG16_PUBLISHED = 0.935


def markdown(result: dict, batch: int, solver_file: str, *, size: int, color: bool,
             target: float, plot_name: str, pad: int = 0) -> str:
    r, t = result["train"], result["test"]
    n_train, ips = result["n_train"], r["images_per_second"]
    total_images = result["total_iterations"] * batch
    epochs = total_images / n_train
    schedule = result["schedule_iterations"] * batch / n_train    # the solver file's max_iter
    resumed = f", resumed at iteration {r['start_iter']}" if r["start_iter"] else ""
    stored = "colour" if color else "grey (1 channel; the net infers conv1/proj1 input channels)"
    reached = t["accuracy"] >= target
    model, crop = result.get("model", "vgg16_landmark_64"), result.get("crop", 64)
    net = result.get("net", "models/vgg16_landmark_64/train_val.prototxt")
    commands = [s.get("command") for s in result.get("segments", [])]
    if len(commands) < 2 or not all(commands):      # one invocation, or some not recorded
        commands = [result["command"]]
    lines = [
        f"# Scale benchmark: {model} on the full Fashion-MNIST", "",
        "Command:" if len(commands) == 1 else "Commands, in order (each resumes the one before):",
        "", *(f"    {c}" for c in commands), "",
        f"- Machine: {result['machine']}; 1-minute load average at the end "
        f"{result['load']:.1f} (other work on the same cores slows the measured speed).",
        f"- Data: all {n_train:,} training / {t['images']:,} test images (IDX files of "
        f"`dataset-fashion-mnist`), stored {size}×{size} {stored}"
        + (f" (resized to {size - 2 * pad}×{size - 2 * pad} in a {pad}-pixel black frame)"
           if pad else "") + " with 8 silhouette landmarks "
        f"per record; random {crop}×{crop} crops + mirror for training, centre crop for "
        "testing; mean file of the training set."
        f" LMDB build: {result['build_seconds']:.0f} s "
        f"({'built now' if result['build_seconds'] else 'reused'}).",
        f"- Net and solver: `{net}` (sources rewritten in memory), `{solver_file}`: "
        f"{result['solver']}; from scratch.",
        "",
        "## Measured", "",
        "| | |", "|---|---|",
        f"| training | {result['total_iterations']} iterations × batch {batch} = "
        f"{total_images:,} images = {epochs:.2f} epochs{resumed}"
        f"{' (stopped by the --minutes budget)' if r['stopped_by_budget'] else ''} |",
        *cost_rows(result.get("segments"), r),
        f"| training speed | {f'{ips:.1f} images/s' if ips else 'not measured (no training)'} |",
        f"| train loss (SoftmaxWithLoss, mean of the last 50 iterations) | "
        f"{result['train_loss_last50']:.3f} |",
        f"| **test accuracy** ({t['images']:,} test images) | **{t['accuracy'] * 100:.2f}%** |",
        f"| test loss | {t['loss']:.3f} |",
        f"| final test wall time | {t['seconds']:.0f} s "
        f"({t['images'] / t['seconds']:.0f} images/s) |",
        *([snapshot_check.markdown_row(result["snapshot_check"])]
          if "snapshot_check" in result else []),
        *([oversample.markdown_row(result["oversample"])] if "oversample" in result else []),
        "",
        "Train loss along the run (mean over each tenth of the iterations): "
        + ", ".join(f"{x:.3f}" for x in result["loss_curve"]) + ".",
        "",
    ]
    if len(result["tests"]) > 1:
        lines += ["Test accuracy during the run:", "", "| iteration | epoch | test accuracy | "
                  "test loss |", "|---|---|---|---|"]
        lines += [f"| {p['iter']} | {p['iter'] * batch / n_train:.1f} | "
                  f"{p['accuracy'] * 100:.2f}% | {p['loss']:.3f} |" for p in result["tests"]]
        lines.append("")
    lines += [f"![train loss and test accuracy against epochs]({plot_name})", "",
              f"## The {target * 100:.1f}% target: {'reached' if reached else 'not reached'}", ""]
    verdict = "reaches" if reached else "falls short of"
    lines.append(f"{t['accuracy'] * 100:.2f}% after {epochs:.2f} epochs {verdict} the "
                 f"{target * 100:.1f}% target (published anchors, Fashion-MNIST README: "
                 f"{ANCHORS}).")
    if "oversample" in result:
        ten = result["oversample"]["ten_crop"]
        lines[-1] += (f" Scored as classify.py scores images (ten crops), the same caffemodel "
                      f"{'reaches' if ten >= target else 'falls short of'} it with "
                      f"{ten * 100:.2f}%; the headline figure stays the single centre crop "
                      "that the run's own test uses.")
    if not ips:
        return "\n".join(lines) + "\n"
    lines[-1] += (f" At the measured {ips:.1f} images/s (training only, this CPU, "
                  f"{result['threads']} thread(s)), schedules cost:")
    lines += ["", "| schedule | images | CPU time at the measured speed |", "|---|---|---|"]
    for n in sorted({10, 30, 60, max(1, round(epochs))}):
        mark = f" ({Path(solver_file).name})" if abs(n - schedule) < 0.5 else ""
        mark += " (this run)" if n == max(1, round(epochs)) else ""
        lines.append(f"| {n} epochs{mark} | {n * n_train:,} | "
                     f"{n * n_train / ips / 3600:.1f} h |")
    return "\n".join(lines) + "\n"


def cost_rows(segments: list[dict] | None, this_run: dict) -> list[str]:
    """Training wall time and core-hours (wall × threads) over every invocation of the run."""
    if not segments:
        return [f"| training wall time (this invocation, tests excluded) | "
                f"{this_run['seconds'] / 60:.1f} min |"]
    wall = sum(s["seconds"] for s in segments)
    cores = sum(s["seconds"] * s["threads"] for s in segments)
    parts = "; ".join(f"iterations {s['start']}–{s['end']}: {s['seconds'] / 60:.1f} min at "
                      f"{s['threads']} thread(s)" for s in segments)
    return [f"| training wall time (tests excluded) | {wall / 60:.1f} min ({parts}) |",
            f"| training CPU time (wall × threads) | {cores / 3600:.2f} core-hours |"]


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average over the finite values (NaN marks a lost iteration; the first
    points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64)
    known = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(known, v, 0.0))])
    count = np.concatenate([[0], np.cumsum(known)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (csum[idx] - csum[lo]) / (count[idx] - count[lo])


def plot(train_loss: list[float], tests: list[dict], epoch_iters: float, target: float,
         path: str | Path, model: str = "vgg16_landmark_64") -> Path:
    """Two panels against epochs: smoothed train loss; test accuracy with the target."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    if train_loss:
        window = max(1, round(epoch_iters / 10))
        x = np.arange(1, len(train_loss) + 1) / epoch_iters
        left.plot(x, _smooth(train_loss, window), color="tab:blue",
                  label=f"train loss (moving mean of {window} iterations)")
    test_x = [p["iter"] / epoch_iters for p in tests]
    left.plot(test_x, [p["loss"] for p in tests], "o-", color="tab:orange", ms=3,
              label="test loss")
    left.set_xlabel("epoch")
    left.set_ylabel("softmax loss")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.plot(test_x, [p["accuracy"] * 100 for p in tests], "o-", color="tab:green", ms=3,
               label=f"{model} test accuracy")
    right.axhline(target * 100, color="tab:red", ls="--", lw=1, label=f"target {target:.1%}")
    right.axhline(VGG16_PUBLISHED * 100, color="grey", ls=":", lw=1,
                  label=f"VGG16, published {VGG16_PUBLISHED:.1%}")
    accs = [p["accuracy"] * 100 for p in tests]
    right.set_ylim(max(0.0, min(accs + [target * 100]) - 5), 100)
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle("Full Fashion-MNIST, from scratch", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)
