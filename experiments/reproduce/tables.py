"""Table 1 in the paper's layout, and the vgg16_landmark-vs-AlexNet comparison, from run records.

A run record (``protocol.train_run``) holds per-epoch ``train_loss``, ``test_loss`` and
``test_accuracy``. Over the runs of one model each cell is ``mean ± std`` (sample standard
deviation, ddof = 1; one run shows its value alone). Columns are epochs 10 20 30 40 50 — the
multiples of 10 up to the epochs trained, plus the last one; up to five evenly spaced epochs
when fewer than 10 were trained.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np

METRICS = (("Test Loss", "test_loss"), ("Train Loss", "train_loss"), ("Accuracy", "test_accuracy"))

# The paper's figures (Liao, "Product Information Classification based on CNN"): Table 1 is the
# VGG16 variant (vgg16_landmark), mean of 10 runs; the text gives the 90.7% "average" and
# AlexNet's 87.5% after 50 epochs (Figure 2 has no table).
PAPER = {
    "vgg16_landmark": {"epochs": [10, 20, 30, 40, 50],
                       "test_loss": [1.42, 0.85, 0.46, 0.43, 0.37],
                       "train_loss": [1.38, 0.79, 0.31, 0.41, 0.31],
                       "test_accuracy": [0.18, 0.71, 0.83, 0.87, 0.92],
                       "average_accuracy": 0.907},
    "alexnet": {"final_accuracy": 0.875},
}
AVERAGE_WINDOW = 10     # "average accuracy": mean over the last 10 epochs (our reading)


def family(model: str) -> str:
    """The paper's net a model folder implements: vgg16_landmark_64 → vgg16_landmark.

    Fine-tuned folders map to the same family (vgg16_landmark_64_finetune → vgg16_landmark);
    a variant suffix after it is kept (…_finetune_lw0 → vgg16_landmark_lw0)."""
    return re.sub(r"_\d+(?=_|$)", "", model.replace("_finetune", ""))


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard tables).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def confidence_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% t interval (lo, hi) of paired differences (nan bounds below 2)."""
    arr = np.asarray(diffs, dtype=np.float64)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, math.nan, math.nan
    dof = len(arr) - 1
    t = T95[dof - 1] if dof <= len(T95) else 1.96
    half = t * float(arr.std(ddof=1)) / math.sqrt(len(arr))
    return mean, mean - half, mean + half


def load_records(folder: str | Path, models: list[str] | None = None) -> dict[str, list[dict]]:
    """Finished run records under ``folder/records/<model>/seed<k>.json``, by model, by seed."""
    root = Path(folder) / "records"
    out: dict[str, list[dict]] = {}
    names = models if models is not None else sorted(p.name for p in root.glob("*") if p.is_dir())
    for model in names:
        runs = [json.loads(p.read_text(encoding="utf-8"))
                for p in (root / model).glob("seed*.json")]
        if runs:
            out[model] = sorted(runs, key=lambda r: r["seed"])
    return out


def epoch_columns(epochs: int) -> list[int]:
    """The epochs Table 1 shows: 10 20 30 40 50 for 50 epochs, fewer (or finer) otherwise."""
    if epochs < 10:
        return sorted({int(round(x)) for x in np.linspace(epochs / min(epochs, 5), epochs,
                                                           min(epochs, 5))})
    cols = list(range(10, epochs + 1, 10))
    return cols if cols[-1] == epochs else cols + [epochs]


def curves(runs: list[dict], metric: str) -> np.ndarray:
    """(runs, epochs) values of ``metric``, cut to the epochs every run has."""
    n = min(len(r["records"]) for r in runs)
    return np.array([[rec[metric] for rec in r["records"][:n]] for r in runs], dtype=np.float64)


def summarize(runs: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean and sample std (ddof=1; NaN for a single run) over runs."""
    values = curves(runs, metric)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
    return values.mean(axis=0), std


def _cell(mean: float, std: float, percent: bool) -> str:
    scale, digits, unit = (100.0, 1, "%") if percent else (1.0, 3, "")
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text + unit


def model_table(runs: list[dict], columns: list[int] | None = None) -> str:
    """Rows Test Loss / Train Loss / Accuracy, columns = epochs, cells mean ± std over runs."""
    n_epochs = curves(runs, "test_loss").shape[1]
    columns = columns or epoch_columns(n_epochs)
    lines = ["| | " + " | ".join(str(e) for e in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for label, metric in METRICS:
        mean, std = summarize(runs, metric)
        cells = [_cell(mean[e - 1], std[e - 1], metric == "test_accuracy") for e in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    p = PAPER["vgg16_landmark"]
    lines = ["| | " + " | ".join(map(str, p["epochs"])) + " |", "|---" * 6 + "|"]
    for label, metric in METRICS:
        vals = [f"{v * 100:.0f}%" if metric == "test_accuracy" else f"{v:.2f}" for v in p[metric]]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def final_accuracy(run: dict) -> float:
    return run["records"][-1]["test_accuracy"]


def average_accuracy(run: dict, window: int = AVERAGE_WINDOW) -> float:
    """Mean test accuracy over the run's last ``window`` epochs (our reading of 'average')."""
    return float(np.mean([r["test_accuracy"] for r in run["records"][-window:]]))


def _over_runs(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def paired_difference(a: list[dict], b: list[dict], stat=final_accuracy):
    """Per-seed differences stat(a) − stat(b) over the seeds both have (same split)."""
    b_by_seed = {r["seed"]: r for r in b}
    return [stat(r) - stat(b_by_seed[r["seed"]]) for r in a if r["seed"] in b_by_seed]


def verdict(diffs: list[float], ours: str, theirs: str) -> str:
    """A plain sentence on whether ``ours`` beat ``theirs``, judged against run-to-run noise."""
    if not diffs:
        return f"No runs of {ours} and {theirs} share a split seed; no comparison."
    mean, std = _over_runs(diffs)
    n = len(diffs)
    pts = f"{mean * 100:+.1f} points"
    if n < 2:
        return (f"{ours} vs {theirs}: {pts} at the last epoch from a single run — too few runs "
                "to tell a difference from noise.")
    sem2 = 2 * std / math.sqrt(n) * 100
    if mean > 0 and mean * 100 > sem2:
        return f"**{ours} beats {theirs}** on this data: {pts} at the last epoch " \
               f"(paired over {n} splits; 2 standard errors = {sem2:.1f} points)."
    if mean > 0:
        return f"**{ours} does not clearly beat {theirs}** on this data: {pts} at the last " \
               f"epoch, within run-to-run noise (paired over {n} splits; 2 standard errors = " \
               f"{sem2:.1f} points)."
    return f"**{ours} does not beat {theirs}** on this data: {pts} at the last epoch " \
           f"(paired over {n} splits; 2 standard errors = {sem2:.1f} points)."


def comparison_markdown(records: dict[str, list[dict]]) -> str:
    """The paper's headline figures beside ours: vgg16_landmark, AlexNet, the difference."""
    by_family = {family(m): m for m in records}
    land, alex, plain, lw0 = (by_family.get(f) for f in ("vgg16_landmark", "alexnet", "vgg16",
                                                          "vgg16_landmark_lw0"))
    paper = PAPER["vgg16_landmark"]
    rows = [("", "paper (their data, 10 runs, 50 epochs)", "ours")]

    def acc(model, stat):
        if model is None:
            return "not run"
        runs = records[model]
        mean, std = _over_runs([stat(r) for r in runs])
        n_ep = min(len(r["records"]) for r in runs)
        return f"{_cell(mean, std, True)} ({model}, {_n_runs(len(runs))}, epoch {n_ep})"

    rows.append(("vgg16_landmark: accuracy at the last epoch",
                 f"{paper['test_accuracy'][-1] * 100:.0f}%", acc(land, final_accuracy)))
    rows.append((f"vgg16_landmark: \"average\" accuracy (ours: mean of the last "
                 f"{AVERAGE_WINDOW} epochs)", f"{paper['average_accuracy'] * 100:.1f}%",
                 acc(land, average_accuracy)))
    rows.append(("AlexNet: accuracy at the last epoch",
                 f"{PAPER['alexnet']['final_accuracy'] * 100:.1f}%", acc(alex, final_accuracy)))
    rows.append((f"AlexNet: mean of the last {AVERAGE_WINDOW} epochs", "—",
                 acc(alex, average_accuracy)))
    rows.append(("vgg16 (no landmark branch, the ablation): last epoch", "not reported",
                 acc(plain, final_accuracy)))
    if lw0:
        rows.append(("vgg16_landmark with landmark loss_weight 0 (ablation): last epoch",
                     "not reported", acc(lw0, final_accuracy)))
    diff_paper = (paper["average_accuracy"] - PAPER["alexnet"]["final_accuracy"]) * 100
    diff_final = (paper["test_accuracy"][-1] - PAPER["alexnet"]["final_accuracy"]) * 100
    stats = (("last epoch", final_accuracy),
             (f"mean of the last {AVERAGE_WINDOW} epochs", average_accuracy))
    for what, stat in stats:
        text = "not run"
        if land and alex:
            d = paired_difference(records[land], records[alex], stat)
            if d:
                mean, std = _over_runs(d)
                text = f"{mean * 100:+.1f}" + ("" if math.isnan(std) else f" ± {std * 100:.1f}") \
                    + f" points (paired by split seed, {_n_runs(len(d))})"
        paper_text = (f"{diff_final:+.1f} points (92 − 87.5)" if stat is final_accuracy else
                      f"{diff_paper:+.1f} points (90.7 − 87.5, the paper's claim)")
        rows.append((f"vgg16_landmark − AlexNet ({what})", paper_text, text))
    lines = [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.insert(1, "|---|---|---|")
    out = "\n".join(lines)
    for other, prefix in ((alex, ""), (plain, "Ablation: "),
                          (lw0, "Landmark supervision (loss_weight 0.005 vs 0): ")):
        if land and other:
            out += "\n\n" + prefix + verdict(paired_difference(records[land], records[other]),
                                              land, other)
            avg = paired_difference(records[land], records[other], average_accuracy)
            if len(avg) > 1:
                mean, std = _over_runs(avg)
                out += (f" Over the mean of the last {AVERAGE_WINDOW} epochs: {mean * 100:+.1f} "
                        f"points (2 standard errors = {2 * std / math.sqrt(len(avg)) * 100:.1f}).")
    return out


PAIRS = (("vgg16_landmark", "alexnet"), ("vgg16_landmark", "vgg16"),
         ("vgg16_landmark", "vgg16_landmark_lw0"))


def paired_table(records: dict[str, list[dict]]) -> str:
    """Paired differences (same split seed) with 95% confidence intervals, per pair run."""
    by_family = {family(m): m for m in records}
    lines = ["| difference (points) | n | last epoch: mean [95% CI] | "
             f"mean of the last {AVERAGE_WINDOW} epochs: mean [95% CI] |", "|---|---|---|---|"]
    for a, b in PAIRS:
        if a not in by_family or b not in by_family:
            continue
        cells = []
        for stat in (final_accuracy, average_accuracy):
            d = paired_difference(records[by_family[a]], records[by_family[b]], stat)
            mean, lo, hi = confidence_interval(d) if d else (math.nan,) * 3
            cells.append(f"{mean * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
                         if not math.isnan(lo) else f"{mean * 100:+.1f}")
        lines.append(f"| {by_family[a]} − {by_family[b]} | {len(d)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _n_runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def table1_markdown(records: dict[str, list[dict]], header: str = "") -> str:
    """The whole table1.md: header, the paper's Table 1, ours per model, the comparison."""
    parts = [header.rstrip() + "\n" if header else "",
             "## The paper's Table 1 (VGG16 variant = vgg16_landmark; their data, 10 runs)\n",
             paper_table() + "\n"]
    for model, runs in records.items():
        n_ep = curves(runs, "test_loss").shape[1]
        finals = ", ".join(f"{final_accuracy(r) * 100:.0f}%" for r in runs)
        speed = [r["train_images_per_second"] for r in runs if r.get("train_images_per_second")]
        parts.append(f"## {model}: {_n_runs(len(runs))} × {n_ep} epochs (split seeds "
                     f"{', '.join(str(r['seed']) for r in runs)})\n")
        parts.append(model_table(runs) + "\n")
        parts.append(f"Last-epoch accuracy per run: {finals}. Training speed: "
                     f"{np.mean(speed):.0f} images/s; wall time per run "
                     f"{np.mean([r['seconds'] for r in runs]):.0f} s.\n" if speed else "")
    parts.append("## vgg16_landmark vs AlexNet, the paper's figures beside ours\n")
    parts.append(comparison_markdown(records) + "\n")
    pairs = paired_table(records)
    if pairs:
        parts.append("## Paired differences (the same 40/10 split for both nets of a pair)\n")
        parts.append(pairs + "\n\nAn interval that excludes 0 is a difference at the 95% "
                     "level (Student's t over the splits; the splits, not the test images, "
                     "are the unit).\n")
    return "\n".join(p for p in parts if p)


CSV_FIELDS = ("model", "seed", "epoch", "iter", "train_loss", "train_total_loss", "test_loss",
              "test_accuracy", "lr", "train_seconds", "seconds")


def records_csv(records: dict[str, list[dict]]) -> str:
    """Every epoch record of every run, one CSV row each."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for model, runs in records.items():
        for run in runs:
            for rec in run["records"]:
                row = {"model": model, "seed": run["seed"], **rec}
                w.writerow([row[f] if isinstance(row[f], (int, str)) else f"{row[f]:.6g}"
                            for f in CSV_FIELDS])
    return buf.getvalue()
