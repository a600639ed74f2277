"""Caffe's solvers on tensors: the loop (``base``), its events, update rules (``updates``,
``update``), lr policies, test phases, snapshots and solver-file parsing. pycaffe's solver
classes (``caffe.SGDSolver`` ...) wrap this one layer up, in ``caffe_compat.pycaffe_solver``."""
from caffe_compat.engine.solver.base import NonFiniteLossError, Solver
from caffe_compat.engine.solver.events import (NONE, SNAPSHOT, STOP, IterationDone, RunFinished,
                                               RunStarted, SnapshotWritten, TestDone)
from caffe_compat.engine.solver.lr_policy import LR_POLICIES, LRPolicyError, learning_rate
from caffe_compat.engine.solver.params import SolverParamError, read_solver_param
from caffe_compat.engine.solver.snapshot import SnapshotError
from caffe_compat.engine.solver.updates import SolverTypeError, register_rule, solver_types

__all__ = ["Solver", "NonFiniteLossError", "SolverParamError", "SolverTypeError",
           "SnapshotError", "LRPolicyError", "LR_POLICIES", "learning_rate", "read_solver_param",
           "register_rule", "solver_types", "NONE", "STOP", "SNAPSHOT", "RunStarted",
           "IterationDone", "TestDone", "SnapshotWritten", "RunFinished"]
