"""pycaffe's solvers: ``caffe.get_solver(path)``, ``caffe.SGDSolver(path)`` and siblings.

A thin layer over the engine solver (``caffe_compat.engine.solver``): ``solver.net`` and
``solver.test_nets`` are pycaffe ``Net`` views of its modules. Input blobs are fed from those
views' host arrays (shared memory on the CPU), and after ``step()`` / ``test()`` every blob of
the net holds the last batch's values, as in Caffe, so scripts can read
``solver.net.blobs['label'].data`` or ``solver.test_nets[0].blobs['score'].data``.

``get_solver`` builds the type the file names (``type``, or the legacy ``solver_type``);
``caffe.SGDSolver(path)`` and its siblings build their own type whatever the file says,
as pycaffe does.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import torch

from caffe_compat.engine.solver.base import Solver as EngineSolver
from caffe_compat.proto import caffe_pb2
from caffe_compat._pycaffe.blobs import flush_host_mirrors
from caffe_compat._pycaffe.layerwise import backward_range, forward_range
from caffe_compat._runtime import NCCL
from caffe_compat.engine.layers.blob_vectors import NetVec
from caffe_compat.pycaffe import Net


class Solver(EngineSolver):
    """An engine solver with pycaffe's ``net`` / ``test_nets`` views."""

    def __init__(self, param: "str | os.PathLike[str] | caffe_pb2.SolverParameter",
                 source: str | None = None):
        super().__init__(param, source)
        self.keep_all_blobs = True
        self.net = Net.from_module(self.train_module)
        self.test_nets = NetVec(Net.from_module(m) for m in self.test_modules)
        self._views = [self.net, *self.test_nets]

    def feed(self, net_index: int) -> dict[str, torch.Tensor]:
        """The Input blobs' host arrays as tensors (no copy on the CPU)."""
        net = self._views[net_index]
        out = {}
        for name in net.module.input_names:
            t = torch.from_numpy(net.blobs[name].data)
            out[name] = t if self.device.type == "cpu" else t.to(self.device, non_blocking=True)
        return out

    def blobs_ready(self, net_index: int, blobs: Mapping[str, torch.Tensor]) -> None:
        net = self._views[net_index]
        net.blob_state.clear_stale()     # an earlier fast net.forward() is superseded
        inputs = set(net.module.input_names)
        for name, t in blobs.items():
            if name in net.blobs and name not in inputs:
                net.blob_state.put(name, t)

    # Host mirrors of edited weights (GPU / double: ``_pycaffe.blobs.ParamBlob``) reach the tensors
    # before the engine uses them, and are re-read after it changed them.
    def step(self, iters: int) -> None:
        flush_host_mirrors()
        super().step(iters)
        flush_host_mirrors()

    def solve(self, resume_file: str | None = None) -> None:
        flush_host_mirrors()
        super().solve(resume_file)
        flush_host_mirrors()

    def test(self, test_net_id: int = 0) -> list[float]:
        flush_host_mirrors()
        return super().test(test_net_id)

    def snapshot(self):
        flush_host_mirrors()
        return super().snapshot()

    def restore(self, state_file: str) -> None:
        flush_host_mirrors()
        super().restore(state_file)

    def apply_update(self, display: bool = False) -> None:
        flush_host_mirrors()
        super().apply_update(display)
        flush_host_mirrors()

    @property
    def lr(self) -> float:
        """pycaffe's ``SGDSolver.lr`` (GetLearningRate): the policy's rate at ``iter``.
        As in Caffe, reading it runs the policy, so a multistep boundary reached here moves
        ``current_step`` on (and logs the MultiStep line) exactly as the update would."""
        return self.policy_rate()

    def add_callback(self, on_start=None, on_gradients_ready=None) -> None:
        """``add_callback(on_start, on_gradients_ready)``, or ``add_callback(nccl)`` with an
        object that has both methods (pycaffe's two overloads)."""
        if on_gradients_ready is None and hasattr(on_start, "on_gradients_ready"):
            member = on_start
            if isinstance(member, NCCL):
                if member._attached:
                    return                 # already averaging (net.after_backward(nccl))
                member._attached = True
            on_start, on_gradients_ready = member.on_start, member.on_gradients_ready
        super().add_callback(on_start, on_gradients_ready)

    def _forward_backward(self, feed, keep_all: bool = False):
        """With per-layer callbacks on ``solver.net`` (train.py's timing) the iteration runs
        layer by layer through the Net view so each callback fires at its layer; the
        gradients are the same as the engine's whole-net pass."""
        if not self.net.has_layer_callbacks():
            return super()._forward_backward(feed, keep_all)
        net, last_layer = self.net, len(self.train_module.layers) - 1
        total = 0.0
        for _ in range(self.param.iter_size):
            net.blob_state.clear_stale()
            forward_range(net, 0, last_layer, self.device)
            backward_range(net, last_layer, 0, self.device)
            total += sum(float(w) * float(net.blobs[name].data.sum())
                         for name, w in self.train_module.loss_weights.items())
        outputs = {name: torch.from_numpy(net.blobs[name].data.copy()) for name in net.blobs}
        return float(np.float32(total / self.param.iter_size)), outputs

    def share_weights(self, net: Net) -> None:
        """pycaffe's ``solver.share_weights(net)``: ``net`` uses the train net's weights."""
        net.module.share_trained_layers_with(self.train_module)


class SGDSolver(Solver):
    solver_type = "SGD"


class NesterovSolver(Solver):
    solver_type = "Nesterov"


class AdaGradSolver(Solver):
    solver_type = "AdaGrad"


class RMSPropSolver(Solver):
    solver_type = "RMSProp"


class AdaDeltaSolver(Solver):
    solver_type = "AdaDelta"


class AdamSolver(Solver):
    solver_type = "Adam"


def get_solver(solver: "str | os.PathLike[str] | caffe_pb2.SolverParameter") -> Solver:
    """A solver of the type the solver file (or SolverParameter) names."""
    return Solver(solver)


__all__ = ["get_solver", "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
           "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"]
