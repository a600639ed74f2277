"""SGDSolver::ApplyUpdate on tensors: clip, normalise, regularise, turn diffs into updates.

Parameters whose (lr_mult, decay_mult) agree are updated together with ``torch._foreach``
ops, in place. After ``apply`` each param's ``.grad`` holds the update just subtracted
(SGD's velocity, Adam's step), as Caffe's ComputeUpdateValue leaves it in the param diff.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from caffe_compat.engine.solver.updates import UpdateRule, rule_class
from caffe_compat.formats import glog
from caffe_compat.formats.glog import num
from caffe_compat.proto import caffe_pb2


def f32(x: float) -> float:
    """Round through float32, as Caffe's Dtype arithmetic does."""
    return float(np.float32(x))


@dataclass
class _Group:
    """Learnable params sharing (lr_mult, decay_mult): updated by one set of foreach ops."""
    index: list[int]
    lr_mult: float
    decay_mult: float
    weights: list[torch.Tensor]
    history: list[list[torch.Tensor]]   # [k][j]: k-th history of the group's j-th param


class ParamUpdater:
    """The learnable params of a train net, their solver history and the update rule."""

    def __init__(self, param: caffe_pb2.SolverParameter, module):
        self.param = param
        self.module = module
        self.rule: UpdateRule = rule_class(param.type)(param)
        self.params = [lp.tensor for lp in module.learnable_params]
        self.history = [torch.zeros_like(p, memory_format=torch.contiguous_format)
                        for _ in range(self.rule.num_histories) for p in self.params]
        self.groups = self._make_groups()
        self._zero_diffs: dict[int, torch.Tensor] = {}

    def _make_groups(self) -> list[_Group]:
        by_key: dict[tuple[float, float], list[int]] = {}
        for i, lp in enumerate(self.module.learnable_params):
            by_key.setdefault((lp.lr_mult, lp.decay_mult), []).append(i)
        n = len(self.params)
        return [_Group(idx, lr, dm, [self.params[i] for i in idx],
                       [[self.history[k * n + i] for i in idx]
                        for k in range(self.rule.num_histories)])
                for (lr, dm), idx in by_key.items()]

    def clear_diffs(self) -> None:
        for p in self.params:
            p.grad = None    # autograd writes fresh diffs; the first pass needs no zero fill

    def diffs(self) -> list[torch.Tensor]:
        """Each learnable param's diff; params without a gradient (lr_mult 0) get zeros."""
        out = []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                g = self._zero_diffs.get(i)
                if g is None or g.shape != p.shape:
                    g = self._zero_diffs[i] = torch.zeros_like(p)
                else:
                    g.zero_()
                p.grad = g
            out.append(g)
        return out

    @torch.no_grad()
    def apply(self, rate: float, iteration: int) -> None:
        diffs = self.diffs()
        self._clip(diffs)
        if self.param.iter_size > 1:
            torch._foreach_mul_(diffs, f32(1.0 / self.param.iter_size))
        for g in self.groups:
            gd = [diffs[i] for i in g.index]
            self._regularize(gd, g)
            self.rule.compute(gd, g.history, f32(rate * g.lr_mult), iteration)
            if g.lr_mult != 0:      # lr 0 makes every rule's update exactly 0
                torch._foreach_sub_(g.weights, gd)

    def _clip(self, diffs: list[torch.Tensor]) -> None:
        clip = f32(self.param.clip_gradients)
        if clip < 0 or not diffs:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))
        if norm > clip:
            scale = f32(clip / norm)
            glog.info(f"Gradient clipping: scaling down gradients (L2 norm {num(norm)} > "
                      f"{num(clip)}) by scale factor {num(scale)}", "sgd_solver.cpp:92")
            torch._foreach_mul_(diffs, scale)

    def _regularize(self, diffs: list[torch.Tensor], g: _Group) -> None:
        decay = f32(f32(self.param.weight_decay) * g.decay_mult)
        if not decay:
            return
        if self.param.regularization_type == "L2":
            torch._foreach_add_(diffs, g.weights, alpha=decay)
        else:   # L1 (validated at load)
            torch._foreach_add_(diffs, torch._foreach_sign(g.weights), alpha=decay)
