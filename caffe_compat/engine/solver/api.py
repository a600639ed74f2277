"""pycaffe's solver API: ``caffe.get_solver(path)`` and the typed solver classes.

``get_solver`` builds the type the file names (``type``, or the legacy ``solver_type``);
``caffe.SGDSolver(path)`` and its siblings build their own type whatever the file says,
as pycaffe does. Every solver has ``net`` and ``test_nets`` (pycaffe ``Net`` objects over
the solver's modules), ``iter``, ``step(n)``, ``solve(resume_file=None)``, ``snapshot()``,
``restore(path)`` and ``apply_update()``.
"""
from __future__ import annotations

import os

from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.solver.base import Solver


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
