"""Training curves as a PNG that reads at a glance (matplotlib's Agg backend, no display).

Panels, top to bottom:
  1. the main loss (the output named ``loss``, else the first loss output of the largest
     loss weight): train (per iteration, light, and a moving mean, dark) and test, same
     colour family, so train and test of one quantity compare directly;
  2. accuracy-like outputs (names containing ``acc``): test, and train where the train net
     has one;
  3. only when there are auxiliary losses (e.g. ``landmark_loss``, whose scale is unrelated
     to the main loss): each on its own axis scale, train and test.
The legend sits outside the data, to the right. The same drawing serves a live run (the
``caffe train`` command redraws it at every test from the solver's events) and a finished log
(``tools/plot_log.py``, from the parsed glog lines).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from caffe_compat.commands.logparse import LogData, parse_log
from caffe_compat.formats.atomic import save_figure

Points = list[tuple[int, float]]


@dataclass
class Curves:
    """Scalars over iterations: ``train[name]``, ``test[net][name]``, the smoothed loss."""
    train: dict[str, Points] = field(default_factory=dict)
    test: dict[int, dict[str, Points]] = field(default_factory=dict)
    smoothed_loss: Points = field(default_factory=list)
    loss_weights: dict[str, float] = field(default_factory=dict)
    earlier: list[tuple[int, "Curves"]] = field(default_factory=list)   # (run number, curves)

    def add_train(self, iteration: int, name: str, value: float) -> None:
        self.train.setdefault(name, []).append((iteration, value))

    def add_test(self, iteration: int, net: int, name: str, value: float) -> None:
        self.test.setdefault(net, {}).setdefault(name, []).append((iteration, value))

    def names(self) -> list[str]:
        seen = dict.fromkeys(self.train)
        for outputs in self.test.values():
            seen.update(dict.fromkeys(outputs))
        return list(seen)

    def main_loss(self) -> str | None:
        losses = [n for n in self.names() if "loss" in n.lower()]
        if "loss" in losses:
            return "loss"
        if self.loss_weights:
            weighted = sorted(losses, key=lambda n: -self.loss_weights.get(n, 0.0))
            return weighted[0] if weighted else None
        return losses[0] if losses else None


def curves_from_log(data: LogData, run: int | None = None) -> Curves:
    """The curves of a parsed glog training log (the latest line wins for resumed runs).

    A log of several runs gives the last run's curves, with each earlier run's in
    ``earlier`` (drawn apart, fainter, labelled "run k"); ``run`` picks one run only."""
    runs = data.runs()
    if run is None and len(runs) > 1:
        curves = curves_from_log(data, runs[-1])
        curves.earlier = [(k, curves_from_log(data, r)) for k, r in enumerate(runs[:-1], 1)]
        return curves
    curves = Curves()
    for row in data.latest(data.train, run=run):
        if not math.isnan(row.loss):
            curves.smoothed_loss.append((row.iter, row.loss))
        for name, value in row.outputs.items():
            curves.add_train(row.iter, name, value)
    for net in data.test_nets():
        for row in data.latest(data.test, net, run=run):
            for name, value in row.outputs.items():
                curves.add_test(row.iter, net, name, value)
    return curves


def _moving_mean(points: Points, window: int) -> Points:
    out, total, values = [], 0.0, []
    for it, v in points:
        values.append(v)
        total += v
        if len(values) > window:
            total -= values.pop(0)
        out.append((it, total / len(values)))
    return out


def _draw_quantity(ax, curves: Curves, name: str, color: str, run: str = "",
                   faded: bool = False) -> None:
    """Train (raw, faint; moving mean, solid) and every test net's values of ``name``,
    labelled with ``run`` ("run 1") where given; an earlier run is ``faded`` (dash-dotted)."""
    style = {"alpha": 0.5, "linestyle": "-."} if faded else {}
    tag = f", {run}" if run else ""
    train = [p for p in curves.train.get(name, []) if math.isfinite(p[1])]
    if train:
        xs, ys = zip(*train)
        if len(train) > 20 and not faded:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        if len(train) > 20:
            train = _moving_mean(train, max(5, len(train) // 50))
            xs, ys = zip(*train)
        ax.plot(xs, ys, color=color, linewidth=1.4, label=f"{name} (train{tag})",
                **{"linestyle": "-", **style})
    for net, outputs in sorted(curves.test.items()):
        pts = [p for p in outputs.get(name, []) if math.isfinite(p[1])]
        if pts:
            xs, ys = zip(*pts)
            suffix = "" if net == 0 else f" #{net}"
            ax.plot(xs, ys, marker="s" if faded else "o", color=color, markersize=3.5,
                    linewidth=1.2, markerfacecolor="white",
                    label=f"{name} (test{suffix}{tag})", **{"linestyle": "--", **style})


def _panels(curves: Curves) -> list[tuple[str, list[str]]]:
    names = curves.names()
    main = curves.main_loss()
    panels = []
    if main is not None:
        panels.append(("loss", [main]))
    acc = [n for n in names if "acc" in n.lower()]
    if acc:
        panels.append(("accuracy", acc))
    aux = [n for n in names if "loss" in n.lower() and n != main]
    panels += [(n, [n]) for n in aux]
    if not panels and curves.smoothed_loss:
        panels.append(("loss", []))
    return panels


def plot_curves(curves: Curves, out_png: str, title: str | None = None) -> str:
    """Draw ``curves`` into ``out_png``; returns the path. Raises ValueError when empty."""
    from matplotlib.figure import Figure   # no pyplot: draws with Agg, leaves the backend alone
    panels = _panels(curves)
    if not panels:
        raise ValueError("nothing to plot: no training or test outputs were recorded (was the "
                         "log written with GLOG_minloglevel above 0, or is it not a Caffe "
                         "training log?)")
    fig = Figure(figsize=(9.5, 2.6 * len(panels) + 0.6), dpi=100)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    palette = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown"]
    has_aux = any(label not in ("loss", "accuracy") for label, _ in panels)
    for k, (ax, (label, names)) in enumerate(zip(axes, panels)):
        for j, name in enumerate(names):
            for i, (run, older) in enumerate(curves.earlier):
                _draw_quantity(ax, older, name, palette[(k + j + 3 + i) % len(palette)],
                               f"run {run}", faded=True)
            _draw_quantity(ax, curves, name, palette[(k + j) % len(palette)],
                           f"run {len(curves.earlier) + 1}" if curves.earlier else "")
        # the weighted total differs from the main loss only when auxiliary losses exist
        handles, labels = ax.get_legend_handles_labels()
        if label == "loss" and curves.smoothed_loss and (has_aux or not names):
            # the weighted total has its own scale (auxiliary losses add to it): right axis
            total_ax = ax.twinx() if names else ax
            xs, ys = zip(*curves.smoothed_loss)
            line, = total_ax.plot(xs, ys, color="0.45", linewidth=1.0, linestyle=":",
                                  label="weighted total (train, smoothed; right axis)"
                                  if names else "weighted total (train, smoothed)")
            if names:
                total_ax.set_ylabel("weighted total", color="0.45")
            handles, labels = handles + [line], labels + [line.get_label()]
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if handles:
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.08, 1.0),
                      fontsize="small", frameon=False)
    axes[-1].set_xlabel("iteration")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    save_figure(fig, out_png, format="png")
    return out_png


def plot_log_data(data: LogData, out_png: str, title: str | None = None) -> str:
    return plot_curves(curves_from_log(data), out_png, title)


def plot_log(log_path: str, out_png: str, title: str | None = None) -> str:
    """Parse ``log_path`` and plot it into ``out_png``."""
    return plot_log_data(parse_log(log_path), out_png,
                         title if title is not None else os.path.basename(log_path))


__all__ = ["Curves", "curves_from_log", "plot_curves", "plot_log", "plot_log_data"]
