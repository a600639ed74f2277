"""pycaffe's process-level functions: logging, the layer registry, Timer, and the
multi-GPU bookkeeping (``solver_count``/``solver_rank``/``set_multiprocess``, ``NCCL``).

``caffe.NCCL`` joins the processes of one training over torch.distributed (NCCL on GPUs,
gloo on the CPU) the way BVLC's ``python/train.py`` drives Caffe's: ``NCCL.new_uid()`` in the
parent, then in each process ``set_solver_count``/``set_solver_rank``, the solver,
``NCCL(solver, uid)``, ``bcast()`` and ``solver.add_callback(nccl)``; gradients are summed
and scaled by 1/solver_count before every update, as Caffe's NCCL callback does.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from caffe_compat.engine import distributed
from caffe_compat.engine.layers.base import layer_types
from caffe_compat.formats import glog

_counts = {"multiprocess": False}


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
    return distributed.solver_count()


def set_solver_count(count: int) -> None:
    if int(count) < 1:
        raise ValueError(f"set_solver_count: need at least 1 solver, got {count}")
    distributed.declare(count=int(count))


def solver_rank() -> int:
    """This solver's rank (set_solver_rank, else the torch.distributed rank)."""
    return distributed.solver_rank()


def set_solver_rank(rank: int) -> None:
    if int(rank) < 0:
        raise ValueError(f"set_solver_rank: rank must be >= 0, got {rank}")
    distributed.declare(rank_=int(rank))


def set_multiprocess(multiprocess: bool) -> None:
    _counts["multiprocess"] = bool(multiprocess)


def multiprocess() -> bool:
    return bool(_counts["multiprocess"])


def has_nccl() -> bool:
    """True where torch.distributed is built in: ``caffe.NCCL`` then works (module docstring)."""
    return dist.is_available()


class NCCL:
    """``caffe.NCCL(solver, uid)``: this process's member of a data-parallel training.

    Joins the group of ``solver_count()`` processes as ``solver_rank()`` (both set by the
    script before, as train.py does); a count of 1 needs no group and every call is a no-op.
    """

    def __init__(self, solver, uid: bytes | str):
        self.solver = solver
        self._attached = False
        count = distributed.solver_count()
        if count > 1:
            distributed.join_group(uid, distributed.solver_rank(), count,
                                   solver.device.type == "cuda")

    @staticmethod
    def new_uid() -> bytes:
        """A group id (a local TCP rendezvous) to hand to every process's ``NCCL(solver, uid)``."""
        return distributed.new_group_id()

    def bcast(self) -> None:
        """Every process starts from the root solver's weights."""
        distributed.broadcast_weights(self.solver)

    # the solver callback (``solver.add_callback(nccl)``)
    def on_start(self) -> None:
        pass

    def on_gradients_ready(self) -> None:
        distributed.average_gradients(self.solver)

    def attach(self) -> None:
        """Average the gradients before each update (once, however it was registered)."""
        if not self._attached:
            self._attached = True
            self.solver.add_callback(self)

    def __call__(self, layer: int) -> None:
        """As a net ``after_backward`` callback (``layer_wise_reduce``): Caffe reduces each
        layer's diffs as its backward ends; here the whole reduce runs once the backward is
        done (``on_gradients_ready``) -- the same averaged diffs, without the overlap."""


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
