"""Subnormal activations in inference: flush-to-zero for the duration of a forward.

A float32 below 2**-126 (1.18e-38) sends every multiply that reads or makes it down the CPU's
microcode assist path (~100x slower per op). Weights are flushed when loaded (engine/
numerics.py); tiny inputs or weights can still make subnormal blobs mid-net. An inference
forward (a FusedNet, engine/net/fuse.py, and its frozen form, engine/net/frozen.py) runs
inside ``FlushDenormals``: the CPU's flush-to-zero and denormals-are-zero modes on
(``torch.set_flush_denormal``) for the call, and put back after it, so training and the
layer-by-layer forward keep Caffe's IEEE arithmetic. Only values below 1.18e-38 change, to 0;
any output they reach moves by at most that times the weights they meet.

The modes are per thread: they cover the calling thread, which runs every kernel when torch
has one thread (the default on a busy machine); at more threads the other threads' shares of
a parallel kernel keep their subnormals. $CAFFE_COMPAT_KEEP_SUBNORMALS=1 keeps subnormal
weights and activations both. Importing this module does not import torch.
"""
from __future__ import annotations

import os

import numpy as np

KEEP_SUBNORMALS_ENV = "CAFFE_COMPAT_KEEP_SUBNORMALS"
_SUBNORMAL, _ONE = np.float32(1e-40), np.float32(1.0)


def keep_subnormals() -> bool:
    return os.environ.get(KEEP_SUBNORMALS_ENV, "") not in ("", "0")


def denormals_flushed() -> bool:
    """Whether this thread's CPU flushes subnormals now (FTZ or DAZ): numpy's scalar multiply
    runs under the same control register as torch's kernels, and costs ~0.15 us."""
    return _SUBNORMAL * _ONE == 0


class FlushDenormals:
    """``with FlushDenormals():`` the block runs with flush-to-zero / denormals-are-zero on in
    this thread, and the thread's mode is put back after it (left alone if already on, or
    where torch cannot set it)."""

    __slots__ = ("_set",)

    def __enter__(self) -> "FlushDenormals":
        import torch
        self._set = not denormals_flushed() and torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc) -> None:
        if self._set:
            import torch
            torch.set_flush_denormal(False)


__all__ = ["KEEP_SUBNORMALS_ENV", "keep_subnormals", "denormals_flushed", "FlushDenormals"]
