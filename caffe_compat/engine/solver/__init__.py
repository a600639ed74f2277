"""Caffe's solvers on PyTorch: the loop (``base``), update rules (``updates``), lr policies,
snapshots, glog lines, solver-file parsing and pycaffe's solver API (``api``)."""
from caffe_compat.engine.solver.api import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                                     RMSPropSolver, SGDSolver, get_solver)
from caffe_compat.engine.solver.base import NonFiniteLossError, Solver
from caffe_compat.engine.solver.lr_policy import LR_POLICIES, LRPolicyError, learning_rate
from caffe_compat.engine.solver.params import SolverParamError, read_solver_param
from caffe_compat.engine.solver.snapshot import SnapshotError
from caffe_compat.engine.solver.updates import SolverTypeError, register_rule, solver_types

__all__ = ["Solver", "get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
           "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "NonFiniteLossError",
           "SolverParamError", "SolverTypeError", "SnapshotError", "LRPolicyError",
           "LR_POLICIES", "learning_rate", "read_solver_param", "register_rule", "solver_types"]
