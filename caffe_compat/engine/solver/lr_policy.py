"""Caffe's learning-rate schedule (``SGDSolver::GetLearningRate``), one function for all policies."""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import math
from typing import Callable

import numpy as np

from caffe_compat.proto import caffe_pb2

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


class LRPolicyError(CaffeCompatError):
    """An unknown ``lr_policy`` or a policy whose parameters are out of range."""


def _f32(x: float) -> float:
    return float(np.float32(x))


def learning_rate(param: caffe_pb2.SolverParameter, it: int, current_step: int = 0,
                  log: Callable[[str], None] | None = None) -> tuple[float, int]:
    """The learning rate for iteration ``it`` and the new ``current_step``.

    ``it`` is the number of updates already done (Caffe's ``iter_``). Policies:

    - fixed:     base_lr
    - step:      base_lr · gamma^floor(it / stepsize)          (current_step = floor(it / stepsize))
    - exp:       base_lr · gamma^it
    - inv:       base_lr · (1 + gamma · it)^(−power)
    - multistep: base_lr · gamma^current_step, where current_step goes up by at most one per
                 call, when it ≥ stepvalue[current_step] (and ``log`` gets
                 "MultiStep Status: Iteration <it>, step = <s>")
    - poly:      base_lr · (1 − it / max_iter)^power
    - sigmoid:   base_lr / (1 + exp(−gamma · (it − stepsize)))

    Caffe computes in float32 (``Solver<float>``); the result is rounded to float32 here too.
    """
    policy = param.lr_policy
    base_lr, gamma, power = param.base_lr, param.gamma, param.power
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        _require(param.stepsize > 0, "step", f"stepsize must be > 0 (got {param.stepsize})")
        current_step = it // param.stepsize
        rate = base_lr * gamma ** current_step
    elif policy == "exp":
        rate = base_lr * gamma ** it
    elif policy == "inv":
        rate = base_lr * _f32(1.0 + _f32(gamma * it)) ** -power
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            if log is not None:
                log(f"MultiStep Status: Iteration {it}, step = {current_step}")
        rate = base_lr * gamma ** current_step
    elif policy == "poly":
        _require(param.max_iter > 0, "poly", f"max_iter must be > 0 (got {param.max_iter})")
        rate = base_lr * _f32(1.0 - _f32(np.float32(it) / np.float32(param.max_iter))) ** power
    elif policy == "sigmoid":
        z = _f32(-gamma * _f32(it - param.stepsize))
        rate = base_lr * _f32(1.0 / _f32(1.0 + _f32(_exp(z))))
    else:
        raise LRPolicyError(unknown_policy_message(policy))
    return _f32(rate), current_step


def unknown_policy_message(policy: str) -> str:
    shown = f"'{policy}'" if policy else "(unset)"
    fork = " ('plateau' is weiliu89/caffe's (SSD), not implemented here)" \
        if policy == "plateau" else ""
    return (f"Unknown learning rate policy: {shown}{fork} (known policies: "
            f"{', '.join(LR_POLICIES)}); set lr_policy in the solver file")


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _require(ok: bool, policy: str, what: str) -> None:
    if not ok:
        raise LRPolicyError(f"lr_policy \"{policy}\": {what}")
