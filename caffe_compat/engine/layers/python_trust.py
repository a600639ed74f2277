"""What a ``type: "Python"`` layer may run: only layer classes, and nothing when refused.

A Python layer runs user code by design: ``python_param.module`` is imported (its top level
runs) and ``python_param.layer`` is instantiated. Two rules keep a prototxt from doing more:

- the named object must be a class derived from ``PythonLayerBase`` (pycaffe's ``caffe.Layer``
  derives from it), as Caffe requires a ``caffe.Layer``; ``module: "os" layer: "abort"`` or
  ``layer: "exit"`` in ``sys`` are refused before anything is called;
- before anything is imported, ``module`` and ``layer`` must be valid Python names, the
  module must be findable (``importlib.util.find_spec``: a search, no code runs), and it
  must not be a standard-library module: ``module: "this"`` (whose import prints the Zen of
  Python) or ``"antigravity"`` (opens a web browser) hold no layer class, so they are
  refused without importing them. Importing a module that passes runs its top-level code:
  a net definition naming a Python layer is code;
- Python layers can be refused outright, for prototxt from an untrusted source: set
  ``CAFFE_COMPAT_PYTHON_LAYERS=refuse`` in the environment, or build the net with
  ``build_net(..., allow_python_layers=False)`` / ``caffe.Net(..., allow_python_layers=False)``.
  The module is then never imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import inspect
import keyword
import os
import sys
import sysconfig
from typing import Iterator

_ALLOWED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("python_layers",
                                                                      default=None)
_REFUSE_WORDS = ("0", "no", "off", "false", "refuse", "deny")


class PythonLayerBase:
    """The base of every Python layer class (pycaffe's ``caffe.Layer`` derives from it)."""


def python_layers_allowed() -> bool:
    """The innermost ``allow_python_layers`` setting, else $CAFFE_COMPAT_PYTHON_LAYERS."""
    flag = _ALLOWED.get()
    if flag is not None:
        return flag
    return os.environ.get("CAFFE_COMPAT_PYTHON_LAYERS", "").strip().lower() not in _REFUSE_WORDS


@contextlib.contextmanager
def allow_python_layers(flag: bool | None) -> Iterator[None]:
    """Within the block, Python layers are allowed (True), refused (False) or as the
    environment says (None)."""
    token = _ALLOWED.set(flag if flag is None else bool(flag))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def refusal(module_name: str) -> str | None:
    """The error text when Python layers are refused here, else None."""
    if python_layers_allowed():
        return None
    return (f"Python layers are refused (untrusted net definition); python_param.module "
            f"'{module_name}' was not imported. Allow them with allow_python_layers=True or "
            "unset CAFFE_COMPAT_PYTHON_LAYERS")


def _valid_name(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _standard_library(spec) -> bool:
    """Whether the module that ``spec`` locates is built in, frozen or in the stdlib folder."""
    if spec.origin in ("built-in", "frozen"):
        return True
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep
    # a namespace package (a folder without __init__.py) has locations but no origin
    paths = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    return bool(paths) and all(
        os.path.realpath(path).startswith(stdlib) and
        "site-packages" not in os.path.realpath(path).split(os.sep) for path in paths)


def unimportable(module_name: str, layer_name: str) -> str | None:
    """The error text when ``python_param`` can be refused without importing anything:
    names that are not Python names, a module that cannot be found, or a standard-library
    module (it holds no layer class, and importing it runs its code). None when the
    module may be imported."""
    if not all(_valid_name(part) for part in module_name.split(".")):
        return f"python_param.module '{module_name}' is not a Python module name"
    if not _valid_name(layer_name):
        return f"python_param.layer '{layer_name}' is not a Python class name"
    top = module_name.split(".")[0]
    if top in sys.modules and top not in getattr(sys, "stdlib_module_names", ()):
        return None                           # already imported: importing runs nothing new
    try:
        spec = importlib.util.find_spec(top)  # a search of sys.path: runs no module code
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return (f"cannot import python_param.module '{module_name}': no module '{top}' on "
                "the Python path. Put its folder on PYTHONPATH or run from that folder")
    if _standard_library(spec):
        return (f"python_param.module '{module_name}' is a Python standard-library module, "
                "which holds no caffe.Layer class; it was not imported (importing a module "
                "runs its code)")
    return None


def not_a_layer_class(module_name: str, name: str, obj) -> str | None:
    """The error text when ``obj`` is not a Python layer class, else None."""
    if inspect.isclass(obj) and issubclass(obj, PythonLayerBase):
        return None
    what = "a class" if inspect.isclass(obj) else type(obj).__name__
    return (f"python_param.layer '{module_name}.{name}' is {what}, not a layer class; a "
            "Python layer must be a class derived from caffe.Layer")
