"""caffe-compat: Caffe's prototxt nets, caffemodels and solvers, computed by PyTorch.

Use it like pycaffe: ``import caffe_compat as caffe``.
"""
from caffe_compat import io, proto
from caffe_compat.net_spec import NetSpec, layers, params, to_proto
from caffe_compat.data import landmark_layer as _landmark_layer  # noqa: F401  (registers)
from caffe_compat.data import layers as _data_layers  # noqa: F401  (registers Data, ImageData, ...)
from caffe_compat.engine.layers.base import TEST, TRAIN, layer_types, register
from caffe_compat.engine.mode import set_device, set_mode_cpu, set_mode_gpu
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.pycaffe import Blob, Net
from caffe_compat.pycaffe import PythonLayer as Layer
from caffe_compat.engine.rng import set_seed as set_random_seed
from caffe_compat.engine.solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                                 RMSPropSolver, SGDSolver, Solver, get_solver)

__version__ = "0.1.0"

__all__ = ["TRAIN", "TEST", "Net", "Blob", "NetModule", "build_net", "Layer", "register",
           "layer_types", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed",
           "io", "proto", "get_solver", "Solver", "SGDSolver", "NesterovSolver",
           "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver"]
