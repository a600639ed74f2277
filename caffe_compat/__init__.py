"""caffe-compat: Caffe's prototxt nets, caffemodels and solvers, computed by PyTorch.

Use it like pycaffe: ``import caffe`` (the thin ``caffe`` package installed alongside) or
``import caffe_compat as caffe``. Every name of pycaffe's ``caffe`` namespace is here.

The names load on first use (PEP 562): ``import caffe_compat.formats.glog`` or the log
parser costs no torch import; ``caffe_compat.Net`` imports the engine then.
"""
import importlib

__version__ = "0.1.0"

# Lets code tell this package from BVLC's pycaffe when both are installed.
__caffe_compat__ = True

# pycaffe name -> (module, attribute in it; None: the module itself)
_LAZY = {
    "io": ("caffe_compat.io", None), "proto": ("caffe_compat.proto", None),
    "pycaffe": ("caffe_compat.pycaffe", None), "net_spec": ("caffe_compat.net_spec", None),
    "coord_map": ("caffe_compat.coord_map", None),
    "classifier": ("caffe_compat.classifier", None),
    "detector": ("caffe_compat.detector", None),
    "_caffe": ("caffe_compat._caffe", None),    # caffe._caffe: the extension's names
    "draw": ("caffe_compat.draw", None),         # needs pydot and Graphviz
    "TRAIN": ("caffe_compat.engine.layers.base", "TRAIN"),
    "TEST": ("caffe_compat.engine.layers.base", "TEST"),
    "layer_types": ("caffe_compat.engine.layers.base", "layer_types"),
    "register": ("caffe_compat.engine.layers.base", "register"),
    "set_device": ("caffe_compat.engine.mode", "set_device"),
    "set_mode_cpu": ("caffe_compat.engine.mode", "set_mode_cpu"),
    "set_mode_gpu": ("caffe_compat.engine.mode", "set_mode_gpu"),
    "NetModule": ("caffe_compat.engine.net.module", "NetModule"),
    "build_net": ("caffe_compat.engine.net.module", "build_net"),
    "set_random_seed": ("caffe_compat.engine.rng", "set_seed"),
    "Blob": ("caffe_compat.pycaffe", "Blob"), "Net": ("caffe_compat.pycaffe", "Net"),
    "Layer": ("caffe_compat.pycaffe", "PythonLayer"),
    "NetSpec": ("caffe_compat.net_spec", "NetSpec"),
    "layers": ("caffe_compat.net_spec", "layers"),
    "params": ("caffe_compat.net_spec", "params"),
    "to_proto": ("caffe_compat.net_spec", "to_proto"),
    "Classifier": ("caffe_compat.classifier", "Classifier"),
    "Detector": ("caffe_compat.detector", "Detector"),
}
_LAZY.update({name: ("caffe_compat.pycaffe_solver", name) for name in (
    "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver", "RMSPropSolver",
    "SGDSolver", "Solver", "get_solver")})
_LAZY.update({name: ("caffe_compat._runtime", name) for name in (
    "NCCL", "Timer", "has_nccl", "init_log", "layer_type_list", "log", "set_multiprocess",
    "set_solver_count", "set_solver_rank", "solver_count", "solver_rank")})


def __getattr__(name):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'caffe_compat' has no attribute '{name}'") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value            # later reads skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["TRAIN", "TEST", "Net", "Blob", "NetModule", "build_net", "Layer", "register",
           "layer_types", "layer_type_list", "set_mode_cpu", "set_mode_gpu", "set_device",
           "set_random_seed", "io", "proto", "get_solver", "Solver", "SGDSolver",
           "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
           "layers", "params", "NetSpec", "to_proto", "net_spec", "coord_map", "classifier",
           "detector", "Classifier", "Detector", "pycaffe", "init_log", "log", "NCCL", "Timer",
           "has_nccl", "solver_count", "set_solver_count", "solver_rank", "set_solver_rank",
           "set_multiprocess"]
