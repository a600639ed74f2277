"""The model library (``models/<name>/``) and the files a solver names.

``model_files`` finds a NAME's train_val and solver; ``model_weights`` the caffemodel a
model's own solver fine-tunes from (``weights:``, as models/*_finetune name their
pretraining); ``resolve_path`` reads a relative path the way ``caffe train`` run from some
folder would, trying each root in turn.
"""
from __future__ import annotations

import os
from pathlib import Path

from caffe_compat.commands.common import CliError

MODELS = Path(__file__).resolve().parents[2] / "models"


def resolve_path(entry: str, roots: list[Path]) -> tuple[Path | None, list[Path]]:
    """(the existing file ``entry`` names, or None; the candidates tried): an absolute path
    as it is, a relative one under each of ``roots`` in order."""
    tried = [Path(entry)] if os.path.isabs(entry) else [Path(root) / entry for root in roots]
    return next((t.resolve() for t in tried if t.is_file()), None), tried


def model_files(model: str) -> tuple[Path, Path | None]:
    """(train_val, solver or None) of a models/ NAME, a model folder or a prototxt path."""
    path = Path(model)
    if path.is_file():
        solver = path.with_name("solver.prototxt")
        return path, solver if solver.is_file() else None
    folder = path if (path / "train_val.prototxt").is_file() else MODELS / model
    if (folder / "train_val.prototxt").is_file():
        return folder / "train_val.prototxt", folder / "solver.prototxt"
    known = sorted(p.parent.name for p in MODELS.glob("*/train_val.prototxt"))
    raise CliError(f"--model {model}: neither a prototxt file nor a model folder under "
                   f"{MODELS} (known: {', '.join(known) or 'none'})")


def model_weights(solver_file: Path | None) -> Path | None:
    """The caffemodel a model's own solver fine-tunes from (its ``weights:``, as
    models/*_finetune name their pretraining), or None. A relative path is looked up from
    the working folder, the checkout the model folder lies in (models/<name>/../..), then
    the solver's folder; the first candidate is returned when none exists, for the error to
    name."""
    if solver_file is None:
        return None
    from caffe_compat.engine.solver.params import read_solver_param
    names = [w for field in read_solver_param(os.fspath(solver_file)).weights
             for w in field.split(",") if w]
    if not names:
        return None
    solver = Path(solver_file).resolve()
    checkout = solver.parents[2] if len(solver.parents) > 2 else solver.parent
    hit, tried = resolve_path(names[0], [Path.cwd(), checkout, solver.parent])
    return hit or tried[0]


__all__ = ["MODELS", "model_files", "model_weights", "resolve_path"]
