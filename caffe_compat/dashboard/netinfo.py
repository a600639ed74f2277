"""Model pages: the model library, prototxt validation as you type, drawing, params/FLOPs.

Validation parses the text as the CLI does (``read_text_proto``: ``file:line:col: reason``)
and then builds the net with its data layers as Input layers (``engine.analysis``), so a
wrong bottom, a bad parameter or a shape that does not fit is reported with the engine's own
message; errors without a line of their own get the line of the layer they name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from caffe_compat import draw
from caffe_compat.engine.analysis import data_as_input, layer_macs, layer_params, param_count
from caffe_compat.engine.layers.base import TEST, TRAIN
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import ProtoTextError, read_text_proto
from caffe_compat.formats.errors import CaffeCompatError
from caffe_compat.proto import caffe_pb2

_LAYER_NAMED = re.compile(r"layer '([^']+)'")
PHASES = {"TRAIN": TRAIN, "TEST": TEST}


@dataclass
class Problem:
    message: str
    line: int | None = None
    column: int | None = None


@dataclass
class Validation:
    ok: bool
    errors: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    params: int = 0
    flops: int = 0
    name: str = ""

    def as_dict(self) -> dict:
        return {"ok": self.ok, "name": self.name, "params": self.params, "flops": self.flops,
                "errors": [vars(p) for p in self.errors], "notes": self.notes,
                "layers": self.layers}


def list_models(models_dir: Path) -> list[dict]:
    """The networks under ``models/``: folders with a train_val.prototxt."""
    found = []
    for folder in sorted(p for p in models_dir.glob("*") if (p / "train_val.prototxt").is_file()):
        readme = folder / "readme.md"
        title = readme.read_text(errors="replace").splitlines()[0].lstrip("# ") \
            if readme.is_file() else folder.name
        found.append({"name": folder.name, "title": title,
                      "files": sorted(p.name for p in folder.glob("*.prototxt"))})
    return found


def model_file(models_dir: Path, name: str, file: str = "train_val.prototxt") -> Path | None:
    """``models/<name>/<file>`` when ``name`` is one of the library's models."""
    if name not in {m["name"] for m in list_models(models_dir)} or "/" in file:
        return None
    path = models_dir / name / file
    return path if path.is_file() else None


def layer_line(text: str, layer: str) -> int | None:
    """The line of ``name: "<layer>"`` in the prototxt (1-based), if written once or more."""
    pattern = re.compile(r'(^|[\s{])name\s*:\s*["\']' + re.escape(layer) + r'["\']')
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.search(line.split("#", 1)[0]):
            return number
    return None


def parse(text: str, filename: str) -> caffe_pb2.NetParameter:
    """The NetParameter of ``text``; ProtoTextError (with line and column) when it does not
    parse."""
    return read_text_proto(text, caffe_pb2.NetParameter, filename=filename)


def python_layers(param: caffe_pb2.NetParameter) -> list[str]:
    return [lp.name for lp in param.layer if lp.type == "Python"]


def validate(text: str, filename: str = "train_val.prototxt",
             allow_python_layers: bool = False) -> Validation:
    """Parse and build ``text`` (both phases); the table of the TEST net when it builds."""
    try:
        param = parse(text, filename)
    except ProtoTextError as exc:
        return Validation(False, [Problem(str(exc), exc.line, exc.column)])
    result = Validation(True, name=param.name)
    refused = python_layers(param) if not allow_python_layers else []
    for name in refused:
        result.errors.append(Problem(
            f"{filename}: layer '{name}' (Python): Python layers are refused by this dashboard "
            "(start it with --allow-python-layers to run them)", layer_line(text, name)))
    if refused:
        result.ok = False
        return result
    try:
        param = data_as_input(param)
    except ValueError as exc:
        result.notes.append(f"not built: {exc}")
        return result
    nets, failed = {}, {}
    for phase_name, phase in PHASES.items():
        try:
            nets[phase_name] = build_net(param, phase, source=filename,
                                         allow_python_layers=allow_python_layers)
        except (CaffeCompatError, ValueError, KeyError, RuntimeError) as exc:
            failed[phase_name] = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args \
                else str(exc)
    both = len(failed) == len(PHASES) and len(set(failed.values())) == 1
    for phase_name, message in failed.items():
        if both and phase_name != "TRAIN":
            continue                                    # the same error in both phases: once
        named = _LAYER_NAMED.search(message)
        tag = "" if both else f" [{phase_name} phase]"
        result.errors.append(Problem(message + tag,
                                     layer_line(text, named.group(1)) if named else None))
    if result.errors:
        result.ok = False
    net = nets.get("TEST") or nets.get("TRAIN")
    if net is not None:
        _fill_table(result, net)
    return result


def _fill_table(result: Validation, net) -> None:
    """Per layer: top shape, parameters, FLOPs per image (``engine.analysis``' counts)."""
    for name, layer in net.named_layers():
        tops = net.top_names.get(name) or []
        result.layers.append({"name": name, "type": layer.type,
                              "top": list(net.blob_shapes[tops[0]]) if tops else [],
                              "params": layer_params(net, name),
                              "flops": 2 * layer_macs(net, name)})
    result.params = param_count(net)
    result.flops = sum(row["flops"] for row in result.layers)


def draw_svg(text: str, filename: str = "train_val.prototxt", phase: str = "TRAIN") -> bytes:
    """The net as Graphviz SVG (``caffe.draw``), top to bottom, layers of ``phase``."""
    param = parse(text, filename)
    return draw.draw_net(param, "TB", "svg", phase=PHASES.get(phase, TRAIN))


__all__ = ["Problem", "Validation", "list_models", "model_file", "validate", "draw_svg",
           "python_layers", "layer_line", "parse"]
