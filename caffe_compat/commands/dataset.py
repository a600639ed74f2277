"""``caffe dataset``: a folder of class sub-folders → a Caffe data set ready to train on.

    caffe dataset FOLDER OUT [--resize H W] [--val-percent P | --per-class 40/10] [--seed S]
                  [--backend lmdb|leveldb] [--landmarks list_landmarks.txt]

FOLDER holds one sub-folder per class (FOLDER/<class>/<image>). Writes into OUT:

- ``labels.txt``: the class names, sorted; line i is label i;
- ``train.txt`` / ``val.txt``: Caffe image lists (``<class>/<file> <label>``), a stratified
  split drawn with ``--seed``: ``--val-percent`` of each class held out (default 20), or the
  paper's fixed ``--per-class TRAIN/VAL`` counts; the train list is shuffled as a whole;
- ``train_lmdb/`` / ``val_lmdb/`` (``_leveldb`` with ``--backend leveldb``): Caffe's
  convert_imageset databases, colour BGR resized to ``--resize H W`` (default 72 72);
- ``mean.binaryproto``: the mean image of the training database (compute_image_mean);
- ``contact_sheet.png``: a few images of every class, to check the labels at a glance;
- with ``--landmarks FILE`` (DeepFashion's list_landmarks.txt, image names relative to
  FOLDER): every record carries its image's landmarks (``float_data``, as convert_imageset
  --landmarks), so a model whose Data layer has a third ``landmarks`` top trains on it;
- ``dataset.json``: the summary (classes, per-class train/val counts, skipped files and why,
  resize, backend, seed, the command). A folder holding dataset.json is a DATASET that
  ``caffe fit`` trains on directly.

Files that are not images, or images that cannot be decoded, are skipped and listed with their
reason, never fatal; files outside class folders and hidden files are listed too.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from caffe_compat.commands.common import CliError, add_debug_flag, say
from caffe_compat.commands.sheets import contact_sheet
from caffe_compat.data.image_list import read_image_list, write_image_list
from caffe_compat.data.split import IMAGE_EXTENSIONS, percent_counts, split_counts
from caffe_compat.formats import images
from caffe_compat.formats.atomic import write_text
from caffe_compat.formats.errors import DataError

SUMMARY = "dataset.json"
SCRATCH = ".decoded_lmdb"      # the photos decoded by the scan, while the data set is built
DEFAULT_RESIZE = (72, 72)
DEFAULT_VAL_PERCENT = 20.0
LANDMARK_FILE = "list_landmarks.txt"    # DeepFashion's name: beside the class folders
SHEET_PER_CLASS = 8


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("folder", metavar="FOLDER", help="one sub-folder of images per class")
    ap.add_argument("out", metavar="OUT", help="the data set folder to write")
    ap.add_argument("--resize", nargs=2, type=int, metavar=("H", "W"),
                    default=list(DEFAULT_RESIZE),
                    help="store every image at H×W (default 72 72: room for a 64×64 crop)")
    split = ap.add_mutually_exclusive_group()
    split.add_argument("--val-percent", "--val_percent", dest="val_percent", type=float,
                       help="hold out this percentage of each class for validation "
                            f"(default {DEFAULT_VAL_PERCENT:g})")
    split.add_argument("--per-class", "--per_class", dest="per_class", metavar="TRAIN/VAL",
                       help="exactly TRAIN training and VAL validation images per class "
                            "(the paper's 40/10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    ap.add_argument("--backend", choices=("lmdb", "leveldb"), default="lmdb",
                    help="database backend (default lmdb)")
    ap.add_argument("--status", metavar="FILE",
                    help="keep FILE (JSON) up to date with the stage, records done / total and "
                         "the ETA while building (for a dashboard or script to show)")
    ap.add_argument("--landmarks", metavar="FILE",
                    help="DeepFashion list_landmarks.txt (names relative to FOLDER): store each "
                         "image's landmarks in its record")
    add_debug_flag(ap)


def parse_per_class(text: str) -> tuple[int, int]:
    """'40/10' → (40, 10)."""
    parts = str(text).split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise CliError(f"--per-class {text}: expected TRAIN/VAL counts such as 40/10")
    train, val = (int(p) for p in parts)
    if train < 1 or val < 1:
        raise CliError(f"--per-class {text}: both counts must be at least 1")
    return train, val


def scan_folder(folder: Path, progress=None, exclude: Path | None = None, keep=None):
    """(classes, {class: [readable relative paths]}, [{"path", "reason"}]) for ``folder``;
    ``exclude`` (the output folder, when it lies inside) is not looked at; ``keep(path,
    image)`` receives each image decoded (so that nothing decodes it again)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    candidates, skipped = [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if exclude is not None and exclude in path.parents:
            continue
        if len(path.relative_to(folder).parts) != 2:
            skipped.append({"path": rel, "reason": "not directly inside a class folder"})
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": rel, "reason": f"not an image file ('{path.suffix}')"})
        else:
            candidates.append(rel)
    from caffe_compat.data.convert import progress as bar
    files: dict[str, list[str]] = {}
    for done, rel in enumerate(bar(candidates, total=len(candidates), desc="check images"), 1):
        try:
            image = images.read_image(os.fspath(folder / rel))
        except DataError:
            skipped.append({"path": rel, "reason": "could not be decoded (corrupt or not an "
                                                   "image)"})
        else:
            files.setdefault(rel.split("/")[0], []).append(rel)
            if keep:
                keep(rel, image)
        if progress:
            progress("scan", done, len(candidates))
    if not files:
        raise DataError(f"{folder}: no class sub-folders with readable images")
    return sorted(files), files, skipped


def _split(classes, files, val_percent, per_class, seed):
    if per_class is not None:
        n_train, n_val = parse_per_class(per_class) if isinstance(per_class, str) else per_class
        short = [f"{c} ({len(files[c])})" for c in classes if len(files[c]) < n_train + n_val]
        if short:
            raise DataError(f"too few images for {n_train}/{n_val} per class: {', '.join(short)}")
        counts = {c: (n_train, n_val) for c in classes}
    else:
        counts = percent_counts({c: files[c] for c in classes},
                                DEFAULT_VAL_PERCENT if val_percent is None else val_percent)
    return split_counts(classes, files, counts, seed), counts


def _sheet(folder: Path, classes, train, out: Path) -> str:
    rows = []
    for label, name in enumerate(classes):
        picks = [p for p, lab in train if lab == label][:SHEET_PER_CLASS]
        rows.append((f"{label}: {name}", [(images.read_image(os.fspath(folder / p)),
                                           Path(p).name) for p in picks]))
    return contact_sheet(rows, out / "contact_sheet.png")


class _Decoded:
    """Each readable photo, decoded once by the scan and resized to the stored size, kept as
    its Datum (label 0; its landmarks, when given, in float_data) in a scratch LMDB inside OUT
    until the train/val databases are written: the same bytes convert_imageset would write,
    without decoding the photo again."""

    def __init__(self, out: Path, resize, landmarks: dict | None = None):
        from caffe_compat.data.db import DBWriter
        self.path, self.resize, self.landmarks = out / SCRATCH, resize, landmarks or {}
        self._writer, self._reader = DBWriter(self.path, "lmdb", overwrite=True), None
        self._keys: dict[str, bytes] = {}    # path -> its record's key (paths may be long)

    def put(self, rel: str, image) -> None:
        from caffe_compat.data.convert import image_datum
        key = self._keys[rel] = f"{len(self._keys):08d}".encode()
        datum = image_datum(image, rel, 0, *self.resize, landmarks=self.landmarks.get(rel))
        self._writer.put(key, datum.SerializeToString())

    def datum(self, entry):
        """The Datum of an image list entry, labelled."""
        from caffe_compat.data.db import open_db
        from caffe_compat.proto import caffe_pb2
        if self._reader is None:
            self._writer.close()
            self._reader = open_db(self.path, "lmdb")
        datum = caffe_pb2.Datum.FromString(self._reader.get(self._keys[entry.path]))
        datum.label = entry.label
        return datum

    def __enter__(self) -> "_Decoded":
        return self

    def __exit__(self, *exc) -> None:
        from caffe_compat.formats.atomic import discard_temporary
        if self._reader is not None:
            self._reader.close()
        else:
            self._writer.abort()
        discard_temporary(self.path)


def _databases(folder: Path, out: Path, lists, resize, backend, progress, datums,
               landmarks: Path | None = None) -> dict:
    from caffe_compat.data.convert import compute_mean, convert_imageset
    from caffe_compat.formats.blob_io import write_blobproto
    paths = {}
    for split, list_file in lists.items():
        db = out / f"{split}_{backend}"
        if progress:
            progress(f"{split}_db", 0, len(read_image_list(os.fspath(list_file))))
        each = (lambda done, total, stage=f"{split}_db": progress(stage, done, total)) \
            if progress else None
        convert_imageset(os.fspath(folder) + os.sep, os.fspath(list_file), os.fspath(db),
                         backend=backend, resize_height=resize[0], resize_width=resize[1],
                         overwrite=True, datums=datums, on_record=each,
                         landmark_file=os.fspath(landmarks) if landmarks else None)
        paths[f"{split}_db"] = db.name
    if progress:
        progress("mean", 0, 1)
    write_blobproto(out / "mean.binaryproto", compute_mean(os.fspath(out / paths["train_db"]),
                                                           backend))
    if progress:
        progress("mean", 1, 1)
    paths["mean"] = "mean.binaryproto"
    return paths


def build_dataset(folder, out, *, resize=DEFAULT_RESIZE, val_percent=None, per_class=None,
                  seed: int = 0, backend: str = "lmdb", progress=None, command=None,
                  landmarks=None) -> dict:
    """Build the data set of ``folder`` into ``out``; returns the summary (dataset.json).

    ``per_class`` is (train, val) or 'TRAIN/VAL'; else ``val_percent`` (default 20) of each
    class is held out. ``landmarks``: a list_landmarks.txt whose landmarks every record
    carries. ``progress(stage, done, total)`` is called as work advances: ``scan`` per
    image checked, ``split`` once (done = training records, total = all records),
    ``train_db`` / ``val_db`` per record, ``mean`` and ``contact_sheet`` (0 then 1 of 1).
    """
    import json
    folder, out = Path(folder).resolve(), Path(out)
    height, width = (int(v) for v in resize)
    if height < 1 or width < 1:
        raise CliError(f"--resize {height} {width}: both sizes must be at least 1")
    if val_percent is not None and per_class is not None:
        raise CliError("give --val-percent or --per-class, not both")
    if backend not in ("lmdb", "leveldb"):
        raise CliError(f"--backend {backend}: expected lmdb or leveldb")
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    marks = _landmarks(landmarks)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out}: cannot create the data set folder ({exc.strerror})") from None
    try:
        with _Decoded(out, (height, width), marks and marks["table"]) as decoded:
            classes, files, skipped = scan_folder(folder, progress, out.resolve(), decoded.put)
            if marks is not None:            # the landmark file itself is no stray file
                skipped = [s for s in skipped if folder / s["path"] != marks["path"]]
            (train, val), counts = _split(classes, files, val_percent, per_class, seed)
            if progress:
                progress("split", len(train), len(train) + len(val))
            write_text(out / "labels.txt", "".join(f"{c}\n" for c in classes))
            lists = {"train": out / "train.txt", "val": out / "val.txt"}
            write_image_list(lists["train"], train)
            write_image_list(lists["val"], val)
            paths = _databases(folder, out, lists, (height, width), backend, progress,
                               decoded.datum, marks["path"] if marks else None)
    except BaseException:
        if created:                  # a refused data set leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if progress:
        progress("contact_sheet", 0, 1)
    _sheet(folder, classes, train, out)
    if progress:
        progress("contact_sheet", 1, 1)
    summary = {
        "folder": os.fspath(folder), "classes": classes,
        "counts": {c: {"train": counts[c][0], "val": counts[c][1]} for c in classes},
        "train_count": len(train), "val_count": len(val), "skipped": skipped,
        "resize": [height, width], "channels": 3, "backend": backend, "seed": seed,
        "landmarks": ({"file": os.fspath(marks["path"]), "count": marks["count"],
                       "names": marks["names"]} if marks else None),
        "split": ({"per_class": list(parse_per_class(per_class) if isinstance(per_class, str)
                                     else per_class)} if per_class is not None else
                  {"val_percent": DEFAULT_VAL_PERCENT if val_percent is None else val_percent}),
        "files": {"labels": "labels.txt", "train_list": "train.txt", "val_list": "val.txt",
                  **paths, "contact_sheet": "contact_sheet.png"},
        "command": command or _command_line(folder, out, (height, width), val_percent,
                                            per_class, seed, backend, landmarks),
    }
    write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _landmarks(path) -> dict | None:
    """The landmark file's path, landmarks per image and their names; DataError if unreadable."""
    if path is None:
        return None
    from caffe_compat.data.landmarks import landmark_names, read_landmarks
    marks = read_landmarks(path)
    if not marks:
        raise DataError(f"{path}: no landmark lines")
    count = len(next(iter(marks.values())))
    return {"path": Path(path).resolve(), "count": count, "names": landmark_names(count),
            "table": marks}


def _command_line(folder, out, resize, val_percent, per_class, seed, backend,
                  landmarks=None) -> str:
    split = (f"--per-class {'/'.join(map(str, per_class))}" if isinstance(per_class, tuple)
             else f"--per-class {per_class}" if per_class is not None
             else f"--val-percent {val_percent:g}" if val_percent is not None else "")
    words = ["caffe", "dataset", os.fspath(folder), os.fspath(out), "--resize",
             str(resize[0]), str(resize[1])] + split.split() + ["--seed", str(seed),
                                                                "--backend", backend]
    if landmarks:
        words += ["--landmarks", os.fspath(landmarks)]
    return shlex.join(words)


def is_dataset(path) -> bool:
    """A folder holding dataset.json."""
    return (Path(path) / SUMMARY).is_file()


def read_dataset(path) -> dict:
    """The summary of a DATASET folder; DataError naming the file if it is unreadable."""
    import json
    file = Path(path) / SUMMARY
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable data set summary ({exc})") from None
    for key in ("classes", "resize", "backend", "files"):
        if key not in summary:
            raise DataError(f"{file}: missing '{key}' (rebuild it with caffe dataset)")
    return summary


def report(summary: dict, out) -> None:
    say(f"wrote {out}: {len(summary['classes'])} classes, {summary['train_count']} train / "
        f"{summary['val_count']} val images at {summary['resize'][0]}×{summary['resize'][1]} "
        f"({summary['backend']})")
    for name, n in summary["counts"].items():
        print(f"  {name}: {n['train']} train, {n['val']} val")
    for item in summary["skipped"]:
        print(f"  skipped {item['path']}: {item['reason']}")


def main(args: argparse.Namespace) -> int:
    from caffe_compat.commands.build_progress import BuildProgress
    command = getattr(args, "command_line", None)
    progress = BuildProgress(args.status, log_lines=not sys.stderr.isatty())
    summary = build_dataset(args.folder, args.out, resize=args.resize,
                            val_percent=args.val_percent, per_class=args.per_class,
                            seed=args.seed, backend=args.backend, command=command,
                            landmarks=args.landmarks, progress=progress)
    progress.finish()
    report(summary, args.out)
    return 0


__all__ = ["add_arguments", "build_dataset", "is_dataset", "read_dataset", "main",
           "parse_per_class", "SUMMARY", "LANDMARK_FILE"]
