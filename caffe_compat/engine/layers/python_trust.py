"""What a ``type: "Python"`` layer may run: only layer classes, and nothing when refused.

A Python layer runs user code by design: ``python_param.module`` is imported (its top level
runs) and ``python_param.layer`` is instantiated. Two rules keep a prototxt from doing more:

- the named object must be a class derived from ``PythonLayerBase`` (pycaffe's ``caffe.Layer``
  derives from it), as Caffe requires a ``caffe.Layer``; ``module: "os" layer: "abort"`` or
  ``layer: "exit"`` in ``sys`` are refused before anything is called;
- Python layers can be refused outright, for prototxt from an untrusted source: set
  ``CAFFE_COMPAT_PYTHON_LAYERS=refuse`` in the environment, or build the net with
  ``build_net(..., allow_python_layers=False)`` / ``caffe.Net(..., allow_python_layers=False)``.
  The module is then never imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
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


def not_a_layer_class(module_name: str, name: str, obj) -> str | None:
    """The error text when ``obj`` is not a Python layer class, else None."""
    if inspect.isclass(obj) and issubclass(obj, PythonLayerBase):
        return None
    what = "a class" if inspect.isclass(obj) else type(obj).__name__
    return (f"python_param.layer '{module_name}.{name}' is {what}, not a layer class; a "
            "Python layer must be a class derived from caffe.Layer")
