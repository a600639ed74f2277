"""``import caffe`` for caffe-compat: pycaffe's namespace, computed by PyTorch.

This thin package re-exports ``caffe_compat``; its submodules answer to pycaffe's names
(``caffe.io``, ``caffe.proto.caffe_pb2``, ``caffe.draw``, ``caffe.net_spec``,
``caffe.coord_map``, ``caffe.classifier``, ``caffe.detector``, ``caffe.pycaffe``,
``caffe._caffe``, and SSD's ``caffe.model_libs``) and are
the very same module objects as ``caffe_compat.<name>``. ``caffe.layers`` is NetSpec's layer
factory and also a package: ``caffe.layers.detectnet.clustering`` and ``.mean_ap`` are DIGITS'
DetectNet Python layers (``caffe_compat.detectnet``).

Which ``caffe`` is this? ``caffe.__caffe_compat__`` is True here (BVLC's pycaffe has no
such attribute) and ``caffe.__file__`` points into the caffe-compat installation.
"""
import importlib
import importlib.abc
import importlib.util
import sys

import caffe_compat as _impl
from caffe_compat import *  # noqa: F401,F403  (pycaffe's names)
from caffe_compat import __all__, __caffe_compat__, __version__  # noqa: F401


class _SubmoduleAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``caffe.<sub>`` to the already-importable ``caffe_compat.<sub>``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        real = "caffe_compat" + fullname[len(__name__):]
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ModuleNotFoundError:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module("caffe_compat" + spec.name[len(__name__):])

    def exec_module(self, module):
        pass                       # the caffe_compat module is already executed


if not any(isinstance(f, _SubmoduleAlias) for f in sys.meta_path):
    sys.meta_path.append(_SubmoduleAlias())

for _name in ("io", "proto", "proto.caffe_pb2", "net_spec", "coord_map", "classifier",
              "detector", "pycaffe", "_caffe", "model_libs"):
    sys.modules.setdefault(f"{__name__}.{_name}", importlib.import_module(f"caffe_compat.{_name}"))

# ``caffe.layers`` is a real package (NVIDIA/caffe's Python layers live under it) whose other
# attributes are NetSpec's layer types. Bound now, so it is the same object before and after
# an import of ``caffe.layers.detectnet.clustering`` (an import would rebind it anyway).
layers = importlib.import_module(f"{__name__}.layers")


def __getattr__(name):
    if name == "draw":             # needs pydot and Graphviz: imported on first use
        return importlib.import_module(f"{__name__}.draw")
    return getattr(_impl, name)
