"""Figures like the paper's 1–2: loss and accuracy against epochs, mean line and ±std band.

``fig1_loss.png``: one panel per model, train and test loss. ``fig2_accuracy.png``: test
accuracy of every model on one axis, with the paper's Table 1 points (VGG16 variant) and
AlexNet's reported 87.5% at epoch 50 as markers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from caffe_compat.formats.atomic import save_figure
from experiments.reproduce.tables import PAPER, family, summarize


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _band(ax, runs, metric, label, color, scale=1.0):
    mean, std = summarize(runs, metric)
    x = np.arange(1, len(mean) + 1)
    ax.plot(x, mean * scale, color=color, label=f"{label} (mean of {len(runs)})")
    if len(runs) > 1:
        ax.fill_between(x, (mean - std) * scale, (mean + std) * scale, color=color, alpha=0.2,
                        linewidth=0)


def plot_loss(records: dict[str, list[dict]], path: str | Path) -> Path:
    """Figure 1: train and test loss per model (panels side by side)."""
    plt = _pyplot()
    n = max(1, len(records))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    for ax, (model, runs) in zip(axes[0], records.items()):
        _band(ax, runs, "train_loss", "train loss", "tab:blue")
        _band(ax, runs, "test_loss", "test loss", "tab:orange")
        if family(model) == "vgg16_landmark":
            p = PAPER["vgg16_landmark"]
            ax.plot(p["epochs"], p["train_loss"], "s", color="tab:blue", mfc="none",
                    label="paper train loss")
            ax.plot(p["epochs"], p["test_loss"], "o", color="tab:orange", mfc="none",
                    label="paper test loss")
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("softmax loss (band: ±1 std over runs)")
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_accuracy(records: dict[str, list[dict]], path: str | Path) -> Path:
    """Figure 2: test accuracy per model, with the paper's reported points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"vgg16_landmark": "tab:red", "alexnet": "tab:green", "vgg16": "tab:purple",
              "vgg16_landmark_lw0": "tab:orange"}
    for i, (model, runs) in enumerate(records.items()):
        _band(ax, runs, "test_accuracy", model, colors.get(family(model), f"C{i}"), 100.0)
    p = PAPER["vgg16_landmark"]
    ax.plot(p["epochs"], np.asarray(p["test_accuracy"]) * 100, "o", color="tab:red",
            mfc="none", label="paper: VGG16 variant (Table 1)")
    ax.plot([50], [PAPER["alexnet"]["final_accuracy"] * 100], "^", color="tab:green",
            mfc="none", label="paper: AlexNet at epoch 50")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy, % (band: ±1 std over runs)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
