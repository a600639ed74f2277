"""Numerics hygiene for inference: subnormal weights, CPU threads and OpenMP's wait policy.

- **Subnormal weights.** A float32 below 2**-126 (1.18e-38) in a caffemodel sends every
  multiply that touches it down the CPU's microcode assist path: one such value per filter
  made a 3x3 convolution ~15x slower here (benchmarks/NOTES.md). ``flush_subnormals_`` sets
  them to zero; ``weights.copy_from`` calls it on every loaded blob (one log line says how
  many), unless $CAFFE_COMPAT_KEEP_SUBNORMALS=1. The change to any output is below
  1.2e-38 x (sum of |inputs| it multiplies): invisible at float32 resolution of a normal
  output (tests/test_numerics.py checks a net against float64 with the exact weights).
- **Subnormal activations.** An inference forward flushes them to zero for the duration of
  the call (engine/net/denormals.py, where $CAFFE_COMPAT_KEEP_SUBNORMALS is read too).
- **Threads.** $CAFFE_COMPAT_THREADS (or a command's ``--threads``) sets torch's thread count.
  Without it, a machine already busy gets fewer threads: ``default_threads`` takes the CPUs
  this process may use minus the other work the 1-minute load average shows, at least one.
  On a 2-core machine with the other core busy, two OpenMP threads waited on each other at
  every layer (RFB-320: 172 ms against 25 ms on one thread, issue 23).
- **Wait policy.** OpenMP's default makes idle workers spin; with a neighbour on the other
  core the spinning worker steals the time the main thread needs. ``prefer_passive_wait``
  sets OMP_WAIT_POLICY=PASSIVE unless the user set it, and must run before torch is imported
  (libgomp reads it when it loads): ``caffe_compat/__init__`` does so first thing.
"""
from __future__ import annotations

import logging
import os
import sys

from caffe_compat.engine.net.denormals import KEEP_SUBNORMALS_ENV, keep_subnormals

log = logging.getLogger(__name__)

THREADS_ENV = "CAFFE_COMPAT_THREADS"
FLOAT32_TINY = 1.1754943508222875e-38      # smallest normal float32, 2**-126


def prefer_passive_wait() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless set; True when it will take effect (torch not loaded)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cpus: int | None = None, load: float | None = None) -> int:
    """CPUs minus the busy ones the load average shows (rounded), at least 1."""
    cpus = usable_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cpus, cpus - int(load + 0.5)))


def parse_threads(value, origin: str) -> int:
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        raise ValueError(f"{origin}: threads must be a positive integer, got {value!r}")
    return threads


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else $CAFFE_COMPAT_THREADS, else (when
    neither OMP_NUM_THREADS nor MKL_NUM_THREADS is set) ``default_threads()``. Returns the
    count in force."""
    import torch
    if threads is None and os.environ.get(THREADS_ENV):
        threads = parse_threads(os.environ[THREADS_ENV], f"${THREADS_ENV}")
    if threads is None and not (os.environ.get("OMP_NUM_THREADS")
                                or os.environ.get("MKL_NUM_THREADS")):
        threads = min(torch.get_num_threads(), default_threads())
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def flush_subnormals_(tensor) -> int:
    """Zero the subnormal values of a floating tensor in place; returns how many there were."""
    import torch
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    tiny = torch.finfo(tensor.dtype).tiny
    with torch.no_grad():
        mask = (tensor != 0) & (tensor.abs() < tiny)
        count = int(mask.sum())
        if count:
            tensor.masked_fill_(mask, 0.0)
    return count


__all__ = ["prefer_passive_wait", "usable_cpus", "default_threads", "parse_threads",
           "configure_threads", "flush_subnormals_", "keep_subnormals", "THREADS_ENV",
           "KEEP_SUBNORMALS_ENV"]
