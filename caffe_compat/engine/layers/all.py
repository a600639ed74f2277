"""Import every layer family module in this package so each registers its types."""
import importlib
import pkgutil

import caffe_compat.engine.layers as _pkg

for _info in pkgutil.iter_modules(_pkg.__path__):
    if _info.name not in ("base", "all"):
        importlib.import_module(f"{_pkg.__name__}.{_info.name}")
