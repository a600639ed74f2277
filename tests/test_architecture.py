"""The package's structure: one import direction, pycaffe's namespace on top, one loop."""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import caffe_compat
from test_pycaffe_classifier import PYCAFFE_NAMES   # pycaffe's `caffe` namespace, one list

PACKAGE = Path(caffe_compat.__file__).parent

# formats → engine → data → pycaffe surface → commands and dashboard (a module may import its
# own layer and the layers before it, never one after it).
LAYERS = {"proto": 0, "formats": 0, "engine": 1, "data": 2, "commands": 4, "dashboard": 5}
SURFACE = 3           # every other top-level module: pycaffe's names and their helpers

# top-level modules allowed to carry a pycaffe name: they ARE that pycaffe module
PYCAFFE_MODULES = {"io", "proto", "draw", "net_spec", "coord_map", "classifier", "detector",
                   "pycaffe", "_caffe"}


def _layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "caffe_compat":
        return -1
    if len(parts) == 1:
        return SURFACE
    return LAYERS.get(parts[1], SURFACE)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str):
    """(imported module, line) for every import statement, function-level ones included."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if _is_module(full) else base), node.lineno


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _all_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "proto" in path.relative_to(PACKAGE).parts[:1] and path.name == "caffe_pb2.py":
            continue
        yield path, _module_name(path)


def test_imports_run_one_way():
    wrong = []
    for path, module in _all_modules():
        mine = _layer_of(module)
        for target, line in _imports(path, module):
            if target.split(".")[0] == "experiments":
                wrong.append(f"{module}:{line} imports {target} (experiments are outside "
                             "the library)")
            elif target.startswith("caffe_compat") and _layer_of(target) > mine:
                wrong.append(f"{module}:{line} imports {target} (a layer above it)")
    assert not wrong, "\n".join(wrong)


def test_the_import_check_can_fail(tmp_path):
    """The checker sees relative, aliased and function-level imports (a guard for the guard)."""
    sample = PACKAGE / "engine" / "solver" / "base.py"
    found = {t for t, _ in _imports(sample, "caffe_compat.engine.solver.base")}
    assert "caffe_compat.engine.net.module" in found and "caffe_compat.formats.glog" in found
    assert _layer_of("caffe_compat.commands.train") > _layer_of("caffe_compat.engine.weights")
    assert _layer_of("caffe_compat.pycaffe") > _layer_of("caffe_compat.data.layers")


def test_no_implementation_module_takes_a_pycaffe_name():
    taken = [info.name for info in pkgutil.iter_modules(caffe_compat.__path__)
             if info.name in PYCAFFE_NAMES and info.name not in PYCAFFE_MODULES]
    assert not taken, f"top-level modules shadowing pycaffe names: {taken}"


@pytest.mark.parametrize("name", PYCAFFE_NAMES)
def test_pycaffe_names_mean_what_pycaffe_means(name):
    assert hasattr(caffe_compat, name)


def test_pycaffe_solvers_wrap_the_engine_solver():
    from caffe_compat.engine.solver.base import Solver as EngineSolver
    assert issubclass(caffe_compat.SGDSolver, EngineSolver)
    assert not hasattr(EngineSolver, "net")       # the engine has no pycaffe views


def test_source_files_stay_small():
    big = [f"{p.relative_to(PACKAGE.parent)} ({n} lines)" for p, _ in _all_modules()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450]
    assert not big, "split these files: " + ", ".join(big)


def test_every_package_folder_is_a_regular_package():
    """setuptools' find_packages skips folders without __init__.py: an install would lack them."""
    missing = [str(d.relative_to(PACKAGE.parent)) for d in PACKAGE.rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
               and not (d / "__init__.py").is_file()]
    assert not missing, f"add __init__.py to: {missing}"
