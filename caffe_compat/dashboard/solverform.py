"""The job form's solver fields: Caffe's SolverParameter names, checked by protobuf itself.

``caffe fit`` takes a model's optimiser settings from the ``solver.prototxt`` beside its
train_val (type, base_lr, momentum, ...; the schedule and lengths are its own), so a job with
solver fields gets its own copy of both files in its folder.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from caffe_compat.dashboard.safety import Refused
from caffe_compat.formats.blob_io import ProtoTextError, read_text_proto
from caffe_compat.proto import caffe_pb2

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
# what caffe fit keeps from a model's solver (the schedule is fit's own, lengths per epoch)
FIELDS = {"type": str, "base_lr": float, "momentum": float, "momentum2": float,
          "weight_decay": float, "regularization_type": str, "clip_gradients": float,
          "delta": float, "rms_decay": float}


def checked(fields: dict | None) -> dict:
    """The given solver fields with their Caffe types; 400 naming any unknown or bad one."""
    out = {}
    for name, value in (fields or {}).items():
        if value in (None, ""):
            continue
        if name not in FIELDS:
            raise Refused(400, f"solver field '{name}': the form takes {', '.join(FIELDS)}")
        try:
            out[name] = FIELDS[name](value)
        except (TypeError, ValueError):
            raise Refused(400, f"solver field '{name}': '{value}' is not a "
                               f"{FIELDS[name].__name__}") from None
    if "type" in out and out["type"] not in SOLVER_TYPES:
        raise Refused(400, f"solver type '{out['type']}': one of {', '.join(SOLVER_TYPES)}")
    if "regularization_type" in out and out["regularization_type"] not in ("L1", "L2"):
        raise Refused(400, "regularization_type: L1 or L2")
    return out


def solver_text(base: Path | None, fields: dict) -> str:
    """The model's solver (if any) with ``fields`` set, as prototxt."""
    param = caffe_pb2.SolverParameter()
    if base is not None:
        try:
            param = read_text_proto(base, caffe_pb2.SolverParameter)
        except ProtoTextError as exc:
            raise Refused(400, str(exc)) from None
    for name, value in fields.items():
        setattr(param, name, value)
    return "# solver fields from the dashboard's job form; caffe fit sets the rest\n" + \
        text_format.MessageToString(param)


__all__ = ["checked", "solver_text", "FIELDS", "SOLVER_TYPES"]
