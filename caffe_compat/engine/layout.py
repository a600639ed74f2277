"""``--layout``: the memory layout a train net's convolutions run in.

Caffe's blobs are NCHW and stay so here in every layout: ``nhwc`` changes only the strides
of the 4-D weights (``acceleration.to_channels_last``), which makes PyTorch run each
convolution, and so the activations after it, channels-last. The arithmetic is the same;
results differ from NCHW by float rounding only (another summation order inside the kernel).

Whether it pays is per machine and precision. Measured on VGG16 (batch 8 at 224, a training
step): on an AMX Xeon NHWC was 1.2x faster in fp32 and 1.9x in bf16; on an AVX2 EPYC the
prototxt-built net ran the same or slower. ``auto`` therefore times a short probe (two 3x3
convolutions, forward and backward, at the precision the run will use) in both layouts and
takes NHWC only when it is at least ``margin`` times faster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from caffe_compat.engine.acceleration import to_channels_last, to_contiguous
from caffe_compat.engine.precision import DTYPES, autocast_step, best_times

LAYOUTS = ("nchw", "nhwc")
AUTO = "auto"
LAYOUT_CHOICES = (*LAYOUTS, AUTO)


@dataclass
class LayoutDecision:
    layout: str                    # 'nchw' | 'nhwc'
    reason: str                    # one line for the log
    speedup: float | None = None   # NCHW time / NHWC time on the probe, when probed


def _probe_step(device: torch.device, precision: str, channels_last: bool,
                channels: int = 64, size: int = 56):
    """Forward + backward of conv-ReLU-conv, the inner block of a VGG/ResNet stage."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, channels, size, size, generator=gen)
    w1, w2 = (torch.randn(channels, channels, 3, 3, generator=gen) * 0.05 for _ in range(2))
    x, w1, w2 = (t.to(device).contiguous(memory_format=fmt).requires_grad_()
                 for t in (x, w1, w2))

    def loss():
        return F.conv2d(F.relu(F.conv2d(x, w1, padding=1)), w2, padding=1).float().square().mean()
    return autocast_step(device, DTYPES.get(precision), loss)


def probe_layout_speedup(device: torch.device, precision: str = "fp32",
                         repeats: int = 3) -> float:
    """NCHW time / NHWC time of the probe at ``precision`` (best of ``repeats``, alternated)."""
    best = best_times({layout: _probe_step(device, precision, layout == "nhwc")
                       for layout in LAYOUTS}, repeats)
    return best["nchw"] / best["nhwc"]


def decide_layout(device: torch.device | str, precision: str = "fp32",
                  probe: Callable[[torch.device, str], float] = probe_layout_speedup,
                  margin: float = 1.1) -> LayoutDecision:
    """The layout ``auto`` resolves to for training at ``precision`` on ``device``, and why."""
    device = torch.device(device)
    try:
        speedup = probe(device, precision)
    except RuntimeError as exc:          # a kernel missing for this dtype/layout
        return LayoutDecision("nchw", f"nchw: the NHWC probe failed "
                                      f"({str(exc).splitlines()[0]})")
    if speedup >= margin:
        return LayoutDecision("nhwc", f"nhwc: {speedup:.2f}x faster than NCHW on the {precision} "
                                      "probe", speedup)
    return LayoutDecision("nchw", f"nchw: NHWC was only {speedup:.2f}x the NCHW speed on the "
                                  f"{precision} probe (needs {margin:.2f}x)", speedup)


def apply_layout(module: torch.nn.Module, layout: str) -> int:
    """Store ``module``'s weights in ``layout`` (in place; shared parameters follow).
    Returns how many tensors changed."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout '{layout}': expected one of {', '.join(LAYOUTS)}")
    return to_channels_last(module) if layout == "nhwc" else to_contiguous(module)


__all__ = ["LAYOUTS", "AUTO", "LAYOUT_CHOICES", "LayoutDecision", "probe_layout_speedup",
           "decide_layout", "apply_layout"]
