"""Datasets: a folder of class sub-folders under the data root, built by ``caffe dataset``.

The record's folder ``<workdir>/datasets/<id>/`` holds the worker's log and ``data/``, which is
``caffe dataset``'s output (labels.txt, train/val lists and LMDBs, mean.binaryproto,
contact_sheet.png, dataset.json).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np

from caffe_compat.commands.build_progress import read_status
from caffe_compat.commands.dataset import LANDMARK_FILE
from caffe_compat.dashboard.safety import Refused, check_folder_links, contained
from caffe_compat.dashboard.settings import Settings
from caffe_compat.dashboard.store import Store
from caffe_compat.dashboard.workers import Workers
from caffe_compat.formats.blob_io import read_blobproto

TABLE = "datasets"
BACKENDS = ("lmdb", "leveldb")
DEFAULT_RESIZE = (72, 72)          # caffe dataset's: room for a 64x64 crop


def data_dir(settings: Settings, ident: int) -> Path:
    return settings.folder(TABLE, ident) / "data"


def _options(body: dict) -> dict:
    """The build options of a request, checked (400 on anything out of range)."""
    resize = body.get("resize") or list(DEFAULT_RESIZE)
    try:
        height, width = (int(v) for v in resize)
        val_percent = float(body.get("val_percent", 20))
        seed = int(body.get("seed", 0))
    except (TypeError, ValueError):
        raise Refused(400, "resize must be [height, width]; val_percent and seed numbers") \
            from None
    if not (8 <= height <= 1024 and 8 <= width <= 1024):
        raise Refused(400, f"resize {height}x{width}: each side must be 8..1024")
    if not 0 < val_percent < 100:
        raise Refused(400, f"val_percent {val_percent}: must be between 0 and 100")
    backend = body.get("backend", "lmdb")
    if backend not in BACKENDS:
        raise Refused(400, f"backend '{backend}': one of {', '.join(BACKENDS)}")
    per_class = body.get("per_class")
    if per_class is not None and not re.fullmatch(r"[1-9]\d*/[1-9]\d*", str(per_class)):
        raise Refused(400, f"per_class '{per_class}': TRAIN/VAL image counts, e.g. 40/10")
    return {"resize": [height, width], "val_percent": val_percent, "seed": seed,
            "backend": backend, "per_class": per_class}


def classes_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def create(settings: Settings, store: Store, workers: Workers, body: dict) -> int:
    """Check the request and start ``caffe dataset`` on it; returns the record's id."""
    if not isinstance(body.get("folder"), str):
        raise Refused(400, "give 'folder': a folder of class sub-folders under the data root")
    folder = contained(settings.data_root, body["folder"], "folder")
    if not folder.is_dir():
        raise Refused(400, f"folder '{body['folder']}' is a file, not a folder")
    check_folder_links(folder, settings.data_root)
    classes = classes_of(folder)
    if len(classes) < 2:
        raise Refused(400, f"folder '{body['folder']}' has {len(classes)} class sub-folder(s); "
                           "a classifier needs two or more")
    options = _options(body)
    options["folder"] = str(folder)
    options["landmarks"] = landmark_file(settings, folder, body.get("landmarks"))
    name = str(body.get("name") or folder.name)[:100]
    ident = store.add(TABLE, name, "queued", options)
    out = data_dir(settings, ident)
    split = ["--per-class", options["per_class"]] if options["per_class"] else \
        ["--val-percent", f"{options['val_percent']:g}"]
    argv = ["dataset", str(folder), str(out), "--resize", *map(str, options["resize"]),
            *split, "--seed", str(options["seed"]), "--backend", options["backend"]]
    if options["landmarks"]:
        argv += ["--landmarks", options["landmarks"]]
    argv += ["--status", str(status_path(settings, ident))]
    workers.run(TABLE, ident, argv, settings.folder(TABLE, ident), on_success="ready",
                result_of=lambda: _summary(out))
    return ident


def landmark_file(settings: Settings, folder: Path, given) -> str | None:
    """The landmark list the records carry: ``given`` (under the data root), else the
    folder's own list_landmarks.txt when it has one (``""`` or false: none)."""
    if given is None or given is True:
        auto = folder / LANDMARK_FILE
        if auto.is_file() and not auto.is_symlink():
            return str(auto)
        if given is True:
            raise Refused(400, f"landmarks: the folder has no {LANDMARK_FILE}; name the file")
        return None
    if not given:
        return None
    path = contained(settings.data_root, str(given), "landmarks")
    if not path.is_file():
        raise Refused(400, f"landmarks '{given}' is not a file (DeepFashion's "
                           "list_landmarks.txt)")
    return str(path)


def _summary(out: Path) -> dict:
    """``dataset.json`` of a finished build (ValueError naming it if unreadable)."""
    path = out / "dataset.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def summary_of(settings: Settings, ident: int) -> dict:
    """A ready data set's dataset.json; 409 naming it when unreadable."""
    try:
        return _summary(data_dir(settings, ident))
    except ValueError as exc:
        raise Refused(409, f"dataset {ident}: {exc}") from None


def describe(settings: Settings, store: Store, ident: int) -> dict:
    record = store.get(TABLE, ident)
    if record is None:
        raise Refused(404, f"no dataset {ident}")
    out = data_dir(settings, ident)
    record["files"] = sorted(p.name for p in out.glob("*")) if out.is_dir() else []
    record["progress"] = read_status(status_path(settings, ident))
    return record


def status_path(settings: Settings, ident: int) -> Path:
    """Where the build keeps its progress (``caffe dataset --status``)."""
    return settings.folder(TABLE, ident) / "status.json"


def mean_png(settings: Settings, ident: int) -> bytes:
    """The dataset's mean image (mean.binaryproto, BGR as Caffe stores it) as a PNG."""
    out = data_dir(settings, ident)
    try:
        path = out / _summary(out)["files"]["mean"]    # an imported one lies elsewhere
    except (ValueError, KeyError):
        path = out / "mean.binaryproto"
    if not path.is_file():
        raise Refused(404, f"dataset {ident} has no mean image (yet)")
    mean = read_blobproto(path)
    mean = mean.reshape(mean.shape[-3:])
    image = np.clip(mean.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", image)
    return png.tobytes()


def contact_sheet(settings: Settings, ident: int) -> Path:
    path = data_dir(settings, ident) / "contact_sheet.png"
    if not path.is_file():
        raise Refused(404, f"dataset {ident} has no sample sheet (yet)")
    return path


__all__ = ["create", "describe", "mean_png", "contact_sheet", "data_dir", "classes_of",
           "status_path", "summary_of", "landmark_file"]
