"""Import an existing pair of Caffe databases (LMDB or LevelDB) with its mean and labels as a
dashboard data set: no copy; a ``dataset.json`` in ``caffe dataset``'s format that points at
them, so ``caffe fit`` trains on them as on a built one.

The stored image size comes from the first training record; per-class counts from every
record's label (read once, at import).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from caffe_compat.dashboard.datasets import TABLE, data_dir
from caffe_compat.dashboard.safety import Refused, check_folder_links, contained
from caffe_compat.dashboard.settings import Settings
from caffe_compat.dashboard.store import Store
from caffe_compat.data.bundle import read_labels_file
from caffe_compat.data.db import detect_backend, open_db
from caffe_compat.data.landmarks import landmark_names
from caffe_compat.formats.atomic import write_text
from caffe_compat.formats.blob_io import datum_to_array
from caffe_compat.formats.errors import CaffeCompatError
from caffe_compat.proto import caffe_pb2


def _database(settings: Settings, text, what: str) -> Path:
    if not isinstance(text, str):
        raise Refused(400, f"give '{what}': a database folder under the data root")
    path = contained(settings.data_root, text, what)
    if not path.is_dir():
        raise Refused(400, f"{what} '{text}' is not a database folder")
    check_folder_links(path, settings.data_root)
    return path


def _read(path: Path, classes: int) -> tuple[list[int], Counter, str, int]:
    """(C, H, W) of the first record, the label counts, the backend, and the landmarks every
    record carries (convert_imageset --landmarks: 3 floats each; 0 when any record has
    none)."""
    counts: Counter = Counter()
    shape, landmark_floats = None, None
    try:
        backend = detect_backend(path)
        with open_db(path, backend) as db:
            for _, value in db.items():
                datum = caffe_pb2.Datum.FromString(value)
                if shape is None:
                    shape = list(datum_to_array(datum).shape)
                floats = len(datum.float_data) if datum.data or datum.encoded else 0
                landmark_floats = floats if landmark_floats in (None, floats) else 0
                if not 0 <= datum.label < classes:
                    raise Refused(400, f"{path.name}: a record has label {datum.label}; the "
                                       f"labels file names {classes} classes")
                counts[datum.label] += 1
    except (CaffeCompatError, OSError) as exc:
        raise Refused(400, f"{path.name}: {exc}") from None
    if shape is None:
        raise Refused(400, f"{path.name}: the database is empty")
    marks = landmark_floats // 3 if landmark_floats and landmark_floats % 3 == 0 else 0
    return shape, counts, backend, marks


def import_databases(settings: Settings, store: Store, body: dict) -> int:
    """Record a ready data set over existing databases; returns its id."""
    train = _database(settings, body.get("train_db"), "train_db")
    val = _database(settings, body.get("val_db"), "val_db")
    mean = contained(settings.data_root, body.get("mean") or "", "mean")
    labels_path = contained(settings.data_root, body.get("labels") or "", "labels")
    try:
        labels = read_labels_file(labels_path)
    except CaffeCompatError as exc:
        raise Refused(400, str(exc)) from None
    if len(labels) < 2:
        raise Refused(400, f"labels '{body.get('labels')}': two or more classes, one a line")
    shape, train_counts, backend, marks = _read(train, len(labels))
    val_shape, val_counts, val_backend, val_marks = _read(val, len(labels))
    if val_shape != shape or val_backend != backend:
        raise Refused(400, f"train_db holds {backend} {shape} records but val_db {val_backend} "
                           f"{val_shape}")
    summary = {
        "folder": None, "imported": True, "classes": labels,
        "counts": {name: {"train": train_counts[i], "val": val_counts[i]}
                   for i, name in enumerate(labels)},
        "train_count": sum(train_counts.values()), "val_count": sum(val_counts.values()),
        "skipped": [], "resize": shape[1:], "channels": shape[0], "backend": backend,
        "landmarks": ({"file": None, "count": marks, "names": landmark_names(marks)}
                      if marks and marks == val_marks else None),
        "files": {"labels": str(labels_path), "train_db": str(train), "val_db": str(val),
                  "mean": str(mean)},
    }
    name = str(body.get("name") or train.name)[:100]
    ident = store.add(TABLE, name, "queued", {"imported": {k: str(v) for k, v in
                                                           summary["files"].items()},
                                              "resize": shape[1:]})
    out = data_dir(settings, ident)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "dataset.json", json.dumps(summary, indent=2) + "\n")
    store.update(TABLE, ident, state="ready", result=summary)
    return ident


__all__ = ["import_databases"]
