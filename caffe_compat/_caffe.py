"""``caffe._caffe``: the names pycaffe's compiled extension exports, for scripts that import
it directly or test types against it (``type(net.params[k]) is caffe._caffe.BlobVec``).

Every name is the object ``caffe`` itself uses; nothing here is a second implementation.
"""
from caffe_compat._pycaffe.blobs import Blob
from caffe_compat._runtime import (NCCL, Timer, has_nccl, init_log, layer_type_list, log,
                                   set_multiprocess, set_solver_count, set_solver_rank,
                                   solver_count, solver_rank)
from caffe_compat.engine.layers.base import TEST, TRAIN
from caffe_compat.engine.layers.blob_vectors import (BlobVec, BoolVec, DtypeVec, IntVec,
                                                     LayerVec, NetVec, Phase, RawBlobVec,
                                                     StringVec)
from caffe_compat.engine.mode import set_device, set_mode_cpu, set_mode_gpu
from caffe_compat.engine.rng import set_seed as set_random_seed
from caffe_compat.proto.caffe_pb2 import LayerParameter, SolverParameter
from caffe_compat.pycaffe import Net
from caffe_compat.pycaffe import PythonLayer as Layer
from caffe_compat.pycaffe_solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver,
                                         NesterovSolver, RMSPropSolver, SGDSolver, Solver,
                                         get_solver)

__version__ = "0.1.0"

__all__ = ["Blob", "BlobVec", "RawBlobVec", "LayerVec", "StringVec", "IntVec", "DtypeVec",
           "NetVec", "BoolVec", "Phase", "Net", "Layer", "Solver", "SGDSolver",
           "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
           "get_solver", "NCCL", "Timer", "has_nccl", "init_log", "log", "layer_type_list",
           "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "solver_count",
           "set_solver_count", "solver_rank", "set_solver_rank", "set_multiprocess", "TRAIN",
           "TEST", "LayerParameter", "SolverParameter", "__version__"]
