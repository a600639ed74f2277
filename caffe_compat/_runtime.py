"""pycaffe's process-level functions: logging, the layer registry, Timer, and the
multi-GPU bookkeeping (``solver_count``/``solver_rank``/``set_multiprocess``, ``NCCL``).

Multi-GPU training here runs on torch.distributed (``tools/caffe.py train --gpu 0,1``, or
``torchrun``); Caffe's in-process ``NCCL`` object is not available, so ``has_nccl()`` is
False and constructing ``caffe.NCCL`` says what to use instead.
"""
from __future__ import annotations

import os
import time

import torch

from caffe_compat.engine import distributed
from caffe_compat.engine.layers.base import layer_types
from caffe_compat.formats import glog

_counts = {"solver_count": None, "solver_rank": None, "multiprocess": False}


def layer_type_list() -> list[str]:
    """Every registered layer type string (pycaffe's ``caffe.layer_type_list()``)."""
    return layer_types()


def init_log(level: int | None = None, stderr: bool | None = None) -> None:
    """Caffe's ``init_log([level[, stderr]])``: minimum severity (0 INFO .. 3 FATAL) and
    whether INFO lines go to stderr."""
    if level is not None:
        if int(level) not in range(4):
            raise ValueError(f"init_log: level must be 0..3 (INFO..FATAL), got {level}")
        os.environ["GLOG_minloglevel"] = str(int(level))
    if stderr is not None:
        glog.set_stderr(bool(stderr))


def log(message: str) -> None:
    """Write ``message`` as one glog INFO line, as ``caffe.log`` does."""
    glog.info(str(message), "_caffe.cpp:68")


def solver_count() -> int:
    """Solvers training together (set_solver_count, else the torch.distributed world)."""
    value = _counts["solver_count"]
    return distributed.world_size() if value is None else value


def set_solver_count(count: int) -> None:
    if int(count) < 1:
        raise ValueError(f"set_solver_count: need at least 1 solver, got {count}")
    _counts["solver_count"] = int(count)


def solver_rank() -> int:
    """This solver's rank (set_solver_rank, else the torch.distributed rank)."""
    value = _counts["solver_rank"]
    return distributed.rank() if value is None else value


def set_solver_rank(rank: int) -> None:
    if int(rank) < 0:
        raise ValueError(f"set_solver_rank: rank must be >= 0, got {rank}")
    _counts["solver_rank"] = int(rank)


def set_multiprocess(multiprocess: bool) -> None:
    _counts["multiprocess"] = bool(multiprocess)


def multiprocess() -> bool:
    return bool(_counts["multiprocess"])


def has_nccl() -> bool:
    """False: Caffe's in-process NCCL object is not provided (see the module docstring)."""
    return False


class NCCL:
    """Caffe's NCCL helper is not available; multi-GPU training runs on torch.distributed."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("caffe.NCCL is not available in caffe-compat (has_nccl() is False): "
                           "train on several GPUs with `tools/caffe.py train --solver ... "
                           "--gpu 0,1` or with torchrun (see the README's multi-GPU section)")

    @staticmethod
    def new_uid():
        NCCL()


class Timer:
    """Caffe's Timer: ``start()``, ``stop()``, and ``ms`` (elapsed milliseconds).

    On a GPU the device is synchronised at start and stop, as Caffe's CUDA-event timer
    measures device time.
    """

    def __init__(self):
        self._begin: float | None = None
        self._elapsed = 0.0
        self._running = False

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def start(self) -> None:
        if not self._running:
            self._sync()
            self._begin = time.perf_counter()
            self._running = True

    def stop(self) -> None:
        if self._running:
            self._sync()
            self._elapsed = (time.perf_counter() - self._begin) * 1000.0
            self._running = False

    @property
    def ms(self) -> float:
        """Milliseconds between the last start and stop (stops a running timer, as Caffe)."""
        if self._running:
            self.stop()
        return self._elapsed

    @property
    def seconds(self) -> float:
        return self.ms / 1000.0
