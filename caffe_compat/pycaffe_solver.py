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

import torch

from caffe_compat.engine.solver.base import Solver as EngineSolver
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe import Net


class Solver(EngineSolver):
    """An engine solver with pycaffe's ``net`` / ``test_nets`` views."""

    def __init__(self, param: "str | os.PathLike[str] | caffe_pb2.SolverParameter",
                 source: str | None = None):
        super().__init__(param, source)
        self.keep_all_blobs = True
        self.net = Net.from_module(self.train_module)
        self.test_nets = [Net.from_module(m) for m in self.test_modules]
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
        net._fresh_blobs(needed=False)     # an earlier fast net.forward() is superseded
        inputs = set(net.module.input_names)
        for name, t in blobs.items():
            if name in net.blobs and name not in inputs:
                net.blobs[name]._store(t)

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
