"""``caffe score``: how well a model bundle classifies labelled images.

    caffe score --bundle B FOLDER|LIST [--json] [--out DIR] [--mistakes N]

FOLDER holds one sub-folder per class, named as in the bundle's labels.txt; LIST is a Caffe
image list (``path label`` lines, label = class index or name; relative paths are read beside
the list, in the image folder of a ``caffe dataset`` list (its val.txt), else from the working
directory). Every image gets exactly the training's TEST
preprocessing (the bundle's preprocess.json). Prints the accuracy and each class's precision
and recall, and writes into DIR (default ``score_<FOLDER or LIST name>``):

- ``confusion.csv``: rows = true class, columns = predicted class, counts;
- ``confusion.png``: the same matrix as a picture;
- ``mistakes.png``: the N most confident mistakes (default 24), grouped by true class,
  each captioned with the predicted label and its probability;
- ``score.json``: what ``--json`` prints: accuracy, per_class, confusion, labels, images,
  skipped files and the paths above.
Unreadable images are skipped and listed, never fatal.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from caffe_compat.commands.common import CliError, add_debug_flag, shown
from caffe_compat.commands.sheets import contact_sheet
from caffe_compat.data.split import IMAGE_EXTENSIONS
from caffe_compat.formats.atomic import write_bytes, write_text
from caffe_compat.formats.errors import DataError


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("input", metavar="FOLDER|LIST", help="class folders or a labelled list")
    ap.add_argument("--bundle", required=True, metavar="B", help="the model bundle folder")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", metavar="DIR", help="where the CSV and PNGs go (default "
                                                 "score_<input name>)")
    ap.add_argument("--mistakes", type=int, default=24,
                    help="how many of the most confident mistakes to show (default 24)")
    ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64)
    ap.add_argument("--allow-missing-weights", "--allow_missing_weights",
                    dest="allow_missing_weights", action="store_true",
                    help="score even if the weights leave layers at their initial values")
    add_debug_flag(ap)


def labelled_images(source: str, labels: list[str]) -> list[tuple[str, int]]:
    """(image path, class index) pairs of a class-folder tree or a labelled list."""
    path = Path(source)
    if path.is_dir():
        index = {name: i for i, name in enumerate(labels)}
        found = []
        for folder in sorted(p for p in path.iterdir() if p.is_dir()
                             and not p.name.startswith(".")):
            if folder.name not in index:
                raise DataError(f"{folder}: no class '{folder.name}' in the bundle's labels "
                                f"({', '.join(labels)})")
            found += [(os.fspath(f), index[folder.name]) for f in sorted(folder.iterdir())
                      if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise DataError(f"{path}: no images in class sub-folders")
        return found
    if path.is_file():
        return _list_images(path, labels)
    raise DataError(f"{source}: no such folder or image list")


def _list_bases(path: Path) -> list[Path]:
    """Where a list's relative paths may live: beside it, or (a caffe dataset's train.txt /
    val.txt) in the image folder its dataset.json names."""
    bases = [path.parent]
    summary = path.parent / "dataset.json"
    if summary.is_file():
        try:
            bases.append(Path(json.loads(summary.read_text(encoding="utf-8"))["folder"]))
        except (ValueError, KeyError, TypeError):
            pass
    return bases


def _list_images(path: Path, labels: list[str]) -> list[tuple[str, int]]:
    found, bases = [], _list_bases(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name:
            raise DataError(f"{path}:{number}: expected 'path label', got '{line.strip()}'")
        if label in labels:
            index = labels.index(label)
        elif label.lstrip("-").isdigit() and 0 <= int(label) < len(labels):
            index = int(label)
        else:
            raise DataError(f"{path}:{number}: label '{label}' is neither a class of the "
                            f"bundle nor an index below {len(labels)}")
        places = [base / name for base in bases if (base / name).exists()]
        found.append((os.fspath(places[0]) if places and not os.path.isabs(name) else name,
                      index))
    if not found:
        raise DataError(f"{path}: no images listed")
    return found


def confusion_matrix(truth, predicted, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, int), np.asarray(predicted, int)), 1)
    return matrix


def per_class(matrix: np.ndarray, labels: list[str]) -> dict:
    """Precision, recall and support of each class (None where undefined: no predictions or
    no images of that class)."""
    out = {}
    for i, name in enumerate(labels):
        hits, predicted, actual = int(matrix[i, i]), int(matrix[:, i].sum()), int(matrix[i].sum())
        out[name] = {"precision": hits / predicted if predicted else None,
                     "recall": hits / actual if actual else None, "support": actual}
    return out


def _confusion_csv(matrix: np.ndarray, labels: list[str]) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["true \\ predicted"] + labels)
    for name, row in zip(labels, matrix):
        writer.writerow([name] + [int(v) for v in row])
    return text.getvalue()


def confusion_png(matrix: np.ndarray, labels: list[str], accuracy: float, path) -> None:
    """The confusion matrix as a heat map with its counts, rows = true class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    side = max(4.0, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {accuracy:.3f} over {int(matrix.sum())} images")
    top = matrix.max() or 1
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > top / 2 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def mistakes_sheet(items, probs, labels, count: int, path) -> int:
    """The ``count`` most confident mistakes as a contact sheet; returns how many."""
    from caffe_compat.formats import images
    wrong = [(float(p.max()), k) for k, ((_, truth), p) in enumerate(zip(items, probs))
             if int(p.argmax()) != truth]
    wrong = sorted(wrong, reverse=True)[:max(0, count)]
    rows = {}
    for confidence, k in wrong:
        image_path, truth = items[k]
        caption = f"{labels[int(probs[k].argmax())]} {confidence:.2f}"
        rows.setdefault(truth, []).append((images.read_image(image_path), caption))
    sheet = [(f"true: {labels[t]}", row) for t, row in sorted(rows.items())]
    contact_sheet(sheet or [("no mistakes", [])], path, side=104)
    return len(wrong)


def score_bundle(bundle, source: str, out=None, mistakes: int = 24, batch_size: int = 64,
                 allow_missing_weights: bool = False) -> dict:
    """Score ``bundle`` on the labelled images of ``source``; writes the files into ``out``
    and returns the summary (score.json)."""
    from caffe_compat.classifier import Classifier
    net = Classifier.from_bundle(bundle, allow_missing_weights=allow_missing_weights)
    labels = net.labels
    items = labelled_images(source, labels)
    readable, skipped, blobs = [], [], []
    for image_path, truth in items:
        try:
            blobs.append(net.blob(image_path))
            readable.append((image_path, truth))
        except DataError as exc:
            skipped.append({"path": image_path, "reason": str(exc)})
    if not readable:
        raise DataError(f"{source}: none of the {len(items)} images could be read")
    probs = _probabilities(net, blobs, batch_size)
    truth = [t for _, t in readable]
    predicted = probs.argmax(1)
    matrix = confusion_matrix(truth, predicted, len(labels))
    accuracy = float(np.trace(matrix) / matrix.sum())
    out = Path(out or f"score_{Path(source).stem}")
    out.mkdir(parents=True, exist_ok=True)
    files = {"confusion_csv": out / "confusion.csv", "confusion_png": out / "confusion.png",
             "mistakes": out / "mistakes.png", "summary": out / "score.json"}
    write_text(files["confusion_csv"], _confusion_csv(matrix, labels))
    confusion_png(matrix, labels, accuracy, files["confusion_png"])
    n_mistakes = mistakes_sheet(readable, probs, labels, mistakes, files["mistakes"])
    summary = {"accuracy": accuracy, "images": len(readable), "correct": int(np.trace(matrix)),
               "labels": labels, "per_class": per_class(matrix, labels),
               "confusion": matrix.tolist(), "mistakes_shown": n_mistakes, "skipped": skipped,
               "bundle": os.fspath(Path(bundle).resolve()), "input": os.fspath(source),
               "files": {k: os.fspath(v.resolve()) for k, v in files.items()}}
    write_text(files["summary"], json.dumps(summary, indent=2) + "\n")
    return summary


def _probabilities(net, blobs, batch_size: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(blobs), max(1, batch_size)):
        batch = np.stack(blobs[start:start + batch_size])
        chunks.append(net.forward_blobs(batch))
    return np.concatenate(chunks)


def report(summary: dict) -> str:
    lines = [f"accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['images']} "
             "images)", f"{'class':<20} {'precision':>9} {'recall':>7} {'images':>7}"]
    for name, row in summary["per_class"].items():
        p = "-" if row["precision"] is None else f"{row['precision']:.3f}"
        r = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        lines.append(f"{name:<20} {p:>9} {r:>7} {row['support']:>7}")
    lines += [f"skipped {item['path']}: {item['reason']}" for item in summary["skipped"]]
    lines += [f"{key}: {shown(path)}" for key, path in summary["files"].items()]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.mistakes < 0:
        raise CliError(f"--mistakes must be >= 0 (got {args.mistakes})")
    summary = score_bundle(args.bundle, args.input, args.out, args.mistakes, args.batch_size,
                           args.allow_missing_weights)
    print(json.dumps(summary) if args.json else report(summary))
    return 0


__all__ = ["add_arguments", "score_bundle", "labelled_images", "confusion_matrix",
           "per_class", "main"]
