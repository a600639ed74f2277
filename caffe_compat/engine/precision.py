"""``--precision auto``: pick bf16/fp16 autocast only where it is faster on this machine.

fp32 is what Caffe computes and stays the default. ``auto`` considers a reduced precision
only where the hardware has native support for it:

- CPU: bf16 when the CPU reports AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``); without
  them oneDNN emulates bf16 and is slower than fp32, so no probe is even run;
- CUDA: bf16 where the GPU supports it (Ampere and later), else fp16.

A candidate is then timed against fp32 on a short probe (a 3x3 convolution and a matmul,
forward and backward, the shapes of a mid-sized conv net layer) and chosen only when it is
at least ``margin`` times faster, so ``auto`` is never slower than fp32 on the probe.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass
class PrecisionDecision:
    precision: str            # 'fp32' | 'bf16' | 'fp16'
    reason: str               # one line for the log
    speedup: float | None = None   # fp32 time / candidate time on the probe, when probed


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def candidates(device: torch.device, flags: set[str] | None = None) -> list[str]:
    """Reduced precisions worth probing on ``device``, best first (may be empty)."""
    if device.type == "cuda":
        return ["bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        return ["bf16"] if any(f in flags for f in NATIVE_BF16_CPU_FLAGS) else []
    return []


def autocast_step(device: torch.device, dtype: torch.dtype | None,
                  loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """A probe step: ``loss_of()`` under autocast at ``dtype`` (None: plain fp32), backward,
    and a CUDA sync so that the wall time covers the kernels."""
    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def _probe_step(device: torch.device, dtype: torch.dtype | None, size: int = 28):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, size, size, generator=gen).to(device).requires_grad_()
    w = (torch.randn(64, 64, 3, 3, generator=gen) * 0.05).to(device).requires_grad_()
    a = torch.randn(256, 1024, generator=gen).to(device).requires_grad_()
    b = (torch.randn(1024, 512, generator=gen) * 0.03).to(device).requires_grad_()

    return autocast_step(device, dtype, lambda: F.conv2d(x, w, padding=1).float().square().mean()
                         + (a @ b).float().square().mean())


def best_times(steps: dict[str, Callable[[], None]], repeats: int = 3) -> dict[str, float]:
    """Best wall time of each step, one warm-up call each, then ``repeats`` alternating rounds
    (alternation makes a busy neighbour slow every candidate alike)."""
    best = {k: float("inf") for k in steps}
    for step in steps.values():
        step()                                   # warm-up: kernels, caches, allocator
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def probe_speedup(device: torch.device, precision: str, repeats: int = 3) -> float:
    """fp32 time / ``precision`` time of the probe, alternating the two (best of ``repeats``)."""
    best = best_times({"fp32": _probe_step(device, None),
                       precision: _probe_step(device, DTYPES[precision])}, repeats)
    return best["fp32"] / best[precision]


def decide_precision(device: torch.device | str, flags: set[str] | None = None,
                     probe: Callable[[torch.device, str], float] = probe_speedup,
                     margin: float = 1.1) -> PrecisionDecision:
    """The precision ``auto`` resolves to on ``device``, and why."""
    device = torch.device(device)
    options = candidates(device, flags)
    if not options:
        what = "this CPU has no AMX or AVX512-BF16" if device.type == "cpu" else \
            f"no reduced precision is known to be fast on {device.type}"
        return PrecisionDecision("fp32", f"fp32: {what}")
    best = PrecisionDecision("fp32", "")
    for precision in options:
        try:
            speedup = probe(device, precision)
        except RuntimeError as exc:      # e.g. a kernel missing for this dtype
            best.reason = f"fp32: the {precision} probe failed ({str(exc).splitlines()[0]})"
            continue
        if speedup >= margin and (best.speedup is None or speedup > best.speedup):
            best = PrecisionDecision(precision, f"{precision}: {speedup:.2f}x faster than fp32 "
                                     "on the probe", speedup)
        elif best.precision == "fp32":
            best.reason = (f"fp32: {precision} was only {speedup:.2f}x the fp32 speed on the "
                           f"probe (needs {margin:.2f}x)")
    return best


def choose_precision(device: torch.device | str, **kwargs) -> str:
    """'fp32', 'bf16' or 'fp16': what ``--precision auto`` means on ``device``."""
    return decide_precision(device, **kwargs).precision


__all__ = ["PrecisionDecision", "cpu_flags", "candidates", "autocast_step", "best_times", "probe_speedup",
           "decide_precision", "choose_precision"]
