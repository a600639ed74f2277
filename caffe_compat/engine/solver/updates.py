"""Caffe's update rules (``ComputeUpdateValue``), one small registered class per solver type.

Each rule turns the diffs of one group of parameters (same lr_mult/decay_mult) into the
values that ``Net::Update`` subtracts (``w ← w − update``). Diffs arrive clipped, normalised
by iter_size and regularised, and the rule leaves the update in them, as Caffe's
ComputeUpdateValue does: after ``solver.step`` a param's pycaffe ``.diff`` (and a
``snapshot_diff`` caffemodel) holds the step just taken, e.g. SGD's velocity. Histories
start at 0 and are updated in place; ``history_names`` gives their order in a solverstate
(Caffe keeps ``history_[0..N)`` then, for AdaDelta and Adam, ``history_[N..2N)``).

Formulas (g = diff, lr = local rate = rate · lr_mult, μ = momentum, δ = delta):

- SGD:      V ← μ·V + lr·g;                       update = V
- Nesterov: V ← μ·V + lr·g;                       update = (1+μ)·V − μ·V_old = μ·V + lr·g
- AdaGrad:  H ← H + g²;                           update = lr · g / (√H + δ)
- RMSProp:  H ← ρ·H + (1−ρ)·g²  (ρ = rms_decay);  update = lr · g / (√H + δ)
- AdaDelta: H1 ← μ·H1 + (1−μ)·g²;  u = g·√((H2+δ)/(H1+δ));  H2 ← μ·H2 + (1−μ)·u²;  update = lr·u
- Adam:     m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²  (β1 = momentum, β2 = momentum2);
            update = lr · √(1−β2^t)/(1−β1^t) · m / (√v + δ),  t = iter + 1

Unlike ``torch.optim``, the learning rate lives inside SGD's velocity: after an lr change
the old rate stays baked into V, as in Caffe.
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.proto import caffe_pb2

Tensors = list[torch.Tensor]

_RULES: dict[str, type["UpdateRule"]] = {}


class SolverTypeError(CaffeCompatError):
    """An unknown solver type, or parameters the type does not allow."""


def register_rule(cls: type["UpdateRule"]) -> type["UpdateRule"]:
    """Class decorator: register ``cls`` under its Caffe type string. Duplicates are an error."""
    if cls.type in _RULES:
        raise TypeError(f"solver type '{cls.type}' registered twice "
                        f"({_RULES[cls.type].__name__} and {cls.__name__})")
    _RULES[cls.type] = cls
    return cls


def solver_types() -> list[str]:
    """The registered solver type strings, in Caffe's enum order."""
    return list(_RULES)


def rule_class(type_name: str) -> type["UpdateRule"]:
    try:
        return _RULES[type_name]
    except KeyError:
        raise SolverTypeError(f"Unknown solver type: {type_name or '(empty)'} "
                              f"(known types: {', '.join(solver_types())})") from None


class UpdateRule:
    """Base class: holds the hyper-parameters; subclasses implement ``compute``."""

    type = ""
    num_histories = 1   # history blobs per learnable parameter

    def __init__(self, param: caffe_pb2.SolverParameter):
        self.param = param
        self.momentum = _f32(param.momentum)
        self.delta = _f32(param.delta)
        self.check(param)

    @classmethod
    def check(cls, param: caffe_pb2.SolverParameter) -> None:
        """Raise ``SolverTypeError`` for settings the type does not accept (Caffe's CHECKs)."""

    def compute(self, diffs: Tensors, hist: Sequence[Tensors], lr: float, t: int) -> None:
        """Overwrite one parameter group's ``diffs`` with their update values.

        ``hist[k]``: the group's k-th history tensors; ``lr``: the group's local rate;
        ``t``: updates done so far (iter).
        """
        raise NotImplementedError


def _f32(x: float) -> float:
    return float(np.float32(x))


def _rms_denominator(h: Tensors, delta: float) -> Tensors:
    denom = torch._foreach_sqrt(h)
    torch._foreach_add_(denom, delta)
    return denom


@register_rule
class SGD(UpdateRule):
    type = "SGD"

    def compute(self, diffs, hist, lr, t):
        (v,) = hist
        torch._foreach_mul_(v, self.momentum)
        torch._foreach_add_(v, diffs, alpha=lr)
        torch._foreach_copy_(diffs, v)


@register_rule
class Nesterov(UpdateRule):
    type = "Nesterov"

    def compute(self, diffs, hist, lr, t):
        (v,) = hist
        torch._foreach_mul_(diffs, lr)                       # lr·g
        torch._foreach_mul_(v, self.momentum)
        torch._foreach_add_(v, diffs)                        # V = μ·V_old + lr·g
        torch._foreach_add_(diffs, v, alpha=self.momentum)   # μ·V + lr·g


@register_rule
class AdaGrad(UpdateRule):
    type = "AdaGrad"

    @classmethod
    def check(cls, param):
        if param.momentum != 0:
            raise SolverTypeError(f"Momentum cannot be used with AdaGrad (momentum is "
                                  f"{param.momentum:g}); remove it from the solver file")

    def compute(self, diffs, hist, lr, t):
        (h,) = hist
        torch._foreach_addcmul_(h, diffs, diffs)
        torch._foreach_div_(diffs, _rms_denominator(h, self.delta))
        torch._foreach_mul_(diffs, lr)


@register_rule
class RMSProp(UpdateRule):
    type = "RMSProp"

    @classmethod
    def check(cls, param):
        if param.momentum != 0:
            raise SolverTypeError(f"Momentum cannot be used with RMSProp (momentum is "
                                  f"{param.momentum:g}); remove it from the solver file")
        if not 0 <= param.rms_decay < 1:
            raise SolverTypeError(f"rms_decay should lie between 0 and 1 (got {param.rms_decay:g})")

    def compute(self, diffs, hist, lr, t):
        (h,) = hist
        rho = _f32(self.param.rms_decay)
        torch._foreach_mul_(h, rho)
        torch._foreach_addcmul_(h, diffs, diffs, value=_f32(1 - rho))
        torch._foreach_div_(diffs, _rms_denominator(h, self.delta))
        torch._foreach_mul_(diffs, lr)


@register_rule
class AdaDelta(UpdateRule):
    type = "AdaDelta"
    num_histories = 2

    def compute(self, diffs, hist, lr, t):
        h1, h2 = hist
        rho, delta = self.momentum, self.delta
        torch._foreach_mul_(h1, rho)
        torch._foreach_addcmul_(h1, diffs, diffs, value=_f32(1 - rho))
        ratio = torch._foreach_add(h2, delta)
        torch._foreach_div_(ratio, torch._foreach_add(h1, delta))
        torch._foreach_sqrt_(ratio)
        torch._foreach_mul_(diffs, ratio)                    # u
        torch._foreach_mul_(h2, rho)
        torch._foreach_addcmul_(h2, diffs, diffs, value=_f32(1 - rho))
        torch._foreach_mul_(diffs, lr)


@register_rule
class Adam(UpdateRule):
    type = "Adam"
    num_histories = 2

    def compute(self, diffs, hist, lr, t):
        m, v = hist
        beta1, beta2 = self.momentum, _f32(self.param.momentum2)
        step = t + 1
        correction = _f32(_f32(math.sqrt(_f32(1 - beta2 ** step))) / _f32(1 - beta1 ** step))
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, diffs, alpha=_f32(1 - beta1))
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, diffs, diffs, value=_f32(1 - beta2))
        torch._foreach_copy_(diffs, m)
        torch._foreach_div_(diffs, _rms_denominator(v, self.delta))
        torch._foreach_mul_(diffs, _f32(lr * correction))
