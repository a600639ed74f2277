"""A loss/accuracy PNG from a training log (matplotlib's Agg backend: no display needed).

Left axis: the smoothed training loss (the ``Iteration N, loss = X`` lines) and each test
net's ``loss`` outputs. Right axis: each test net's accuracy-like outputs (names containing
``acc``). Resumed runs are drawn once per iteration, from the latest lines.
"""
from __future__ import annotations

import math
import os

from caffe_compat.formats.atomic import save_figure
from caffe_compat.commands.logparse import LogData, parse_log


def _series(rows, key):
    pts = [(r.iter, v) for r in rows
           if (v := (r.loss if key is None else r.outputs.get(key))) is not None
           and not math.isnan(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_log_data(data: LogData, out_png: str, title: str | None = None) -> str:
    """Draw ``data`` into ``out_png``; returns the path. Raises ValueError when it is empty."""
    from matplotlib.figure import Figure   # no pyplot: draws with Agg, leaves the backend alone

    train = data.latest(data.train)
    if not train and not data.test:
        raise ValueError("the log has no training or test lines to plot (was it written "
                         "with GLOG_minloglevel above 0, or is it not a Caffe training log?)")
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    acc_ax = None
    x, y = _series(train, None)
    if x:
        ax.plot(x, y, label="train loss (smoothed)", color="tab:blue", linewidth=1.2)
    colors = iter(["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink"])
    for net in data.test_nets():
        rows = data.latest(data.test, net)
        names = list(dict.fromkeys(n for r in rows for n in r.outputs))
        suffix = f" (test #{net})"
        for name in names:
            tx, ty = _series(rows, name)
            if not tx:
                continue
            if "acc" in name.lower():
                if acc_ax is None:
                    acc_ax = ax.twinx()
                    acc_ax.set_ylabel("accuracy")
                acc_ax.plot(tx, ty, "o-", markersize=3, label=name + suffix,
                            color="tab:green" if net == 0 else next(colors, "tab:gray"))
            elif "loss" in name.lower():
                ax.plot(tx, ty, "s--", markersize=3, label=name + suffix,
                        color=next(colors, "tab:gray"))
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if acc_ax is not None:
        h2, l2 = acc_ax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, out_png, format="png")
    return out_png


def plot_log(log_path: str, out_png: str, title: str | None = None) -> str:
    """Parse ``log_path`` and plot it into ``out_png``."""
    return plot_log_data(parse_log(log_path), out_png,
                         title if title is not None else os.path.basename(log_path))


__all__ = ["plot_log", "plot_log_data"]
