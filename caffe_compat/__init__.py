"""caffe-compat: Caffe's prototxt nets, caffemodels and solvers, computed by PyTorch.

Use it like pycaffe: ``import caffe`` (the thin ``caffe`` package installed alongside) or
``import caffe_compat as caffe``. Every name of pycaffe's ``caffe`` namespace is here.
"""
from caffe_compat.engine import numerics as _numerics

_numerics.prefer_passive_wait()     # before torch loads libgomp (engine/numerics.py)
from caffe_compat import io, proto
from caffe_compat.data import landmark_layer as _landmark_layer  # noqa: F401  (registers)
from caffe_compat.data import layers as _data_layers  # noqa: F401  (registers Data, ImageData, ...)
from caffe_compat.engine.layers.base import TEST, TRAIN, layer_types, register
from caffe_compat.engine.mode import set_device, set_mode_cpu, set_mode_gpu
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.engine.rng import set_seed as set_random_seed
from caffe_compat import pycaffe
from caffe_compat.pycaffe_solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver,
                                         NesterovSolver, RMSPropSolver, SGDSolver, Solver,
                                         get_solver)
from caffe_compat.pycaffe import Blob, Net
from caffe_compat.pycaffe import PythonLayer as Layer
from caffe_compat._runtime import (NCCL, Timer, has_nccl, init_log, layer_type_list, log,
                                   set_multiprocess, set_solver_count, set_solver_rank,
                                   solver_count, solver_rank)
from caffe_compat import net_spec, coord_map
from caffe_compat.net_spec import NetSpec, layers, params, to_proto
from caffe_compat import classifier, detector
from caffe_compat import _caffe  # noqa: F401  (caffe._caffe: the extension's names)
from caffe_compat.classifier import Classifier
from caffe_compat.detector import Detector

_numerics.configure_threads()        # $CAFFE_COMPAT_THREADS, else fewer on a busy machine

__version__ = "0.1.0"

# Lets code tell this package from BVLC's pycaffe when both are installed.
__caffe_compat__ = True


def __getattr__(name):
    # draw needs pydot and Graphviz; import it only when asked for (``caffe.draw``)
    if name == "draw":
        import importlib
        return importlib.import_module("caffe_compat.draw")
    raise AttributeError(f"module 'caffe_compat' has no attribute '{name}'")


__all__ = ["TRAIN", "TEST", "Net", "Blob", "NetModule", "build_net", "Layer", "register",
           "layer_types", "layer_type_list", "set_mode_cpu", "set_mode_gpu", "set_device",
           "set_random_seed", "io", "proto", "get_solver", "Solver", "SGDSolver",
           "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
           "layers", "params", "NetSpec", "to_proto", "net_spec", "coord_map", "classifier",
           "detector", "Classifier", "Detector", "pycaffe", "init_log", "log", "NCCL", "Timer",
           "has_nccl", "solver_count", "set_solver_count", "solver_rank", "set_solver_rank",
           "set_multiprocess"]
