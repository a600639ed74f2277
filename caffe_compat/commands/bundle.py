"""``caffe bundle``: a trained model as a folder anyone can classify with.

    caffe bundle --solver S.prototxt --weights W.caffemodel --out B [--labels labels.txt]

B gets ``deploy.prototxt`` (the TEST net: Input → layers → Softmax ``prob``),
``weights.caffemodel``, ``labels.txt``, ``preprocess.json`` (everything the TEST data layer
did to an image: stored size, crop, mean, scale, channel order), ``mean.binaryproto`` when the
training subtracted one, and ``README.md``, a model card. The stored image size and channel
count are read from the first record of the TEST database; labels from --labels, else the
labels.txt beside that database (a ``caffe dataset`` folder) or in its parent folder.
``classify --bundle B``, ``caffe score --bundle B`` and ``caffe.Classifier.from_bundle(B)``
then apply exactly that preprocessing. The folder appears complete or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from caffe_compat.commands.common import CliError, add_debug_flag, say
from caffe_compat.commands import netedit
from caffe_compat.data.bundle import (DEPLOY, LABELS, MEAN, PREPROCESS, RESIZE_METHOD, WEIGHTS,
                                      read_labels_file)
from caffe_compat.formats.atomic import atomic_path, write_text
from caffe_compat.proto import caffe_pb2


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--solver", required=True, metavar="S.prototxt",
                    help="the solver of the training run (its net's TEST data layer gives the "
                         "preprocessing)")
    ap.add_argument("--weights", required=True, metavar="W.caffemodel", help="trained weights")
    ap.add_argument("--out", required=True, metavar="B", help="the bundle folder to write")
    ap.add_argument("--labels", metavar="FILE",
                    help="class names, one a line (default: labels.txt beside the TEST database "
                         "or in its parent folder)")
    add_debug_flag(ap)


def preprocess_spec(transform: caffe_pb2.TransformationParameter, stored, data_top: str,
                    input_shape, mean_in_bundle: bool) -> dict:
    """preprocess.json for a TEST transform_param over images stored as C×H×W."""
    channels, height, width = (int(d) for d in stored)
    return {
        "input_blob": data_top, "input_shape": [int(d) for d in input_shape],
        "output_blob": "prob", "resize": [height, width], "resize_method": RESIZE_METHOD,
        "color": channels == 3, "channel_order": "BGR" if channels == 3 else "gray",
        "raw_scale": 255, "crop": int(transform.crop_size), "crop_position": "center",
        "mean_file": MEAN if mean_in_bundle else None,
        "mean_values": [float(v) for v in transform.mean_value] or None,
        "scale": float(transform.scale),
        "mirror_in_training_test": bool(transform.mirror),
        "order": "resize, then (pixel - mean) over the stored image, centre crop, * scale",
    }


def model_card(summary: dict) -> str:
    """README.md of a bundle: what it is, its data, classes, accuracy and provenance."""
    acc = summary.get("val_accuracy")
    data = summary.get("dataset") or {}
    counts = data.get("counts") or {}
    lines = [f"# {summary.get('name', 'model')}: an image classifier bundle", "",
             f"- Classes ({len(summary['labels'])}): {', '.join(summary['labels'])}",
             f"- Validation accuracy: {acc:.4f}" if acc is not None else
             "- Validation accuracy: not measured when this bundle was made",
             f"- Input: {'×'.join(map(str, summary['input_shape'][1:]))} "
             f"(C×H×W), images resized to {summary['resize'][0]}×{summary['resize'][1]}"]
    if summary.get("model"):
        lines.append(f"- Model: {summary['model']}")
    if data:
        lines.append(f"- Data: {data.get('folder', '?')}: {data.get('train_count', '?')} "
                     f"training and {data.get('val_count', '?')} validation images")
        lines += [f"  - {c}: {n['train']} train, {n['val']} val" for c, n in counts.items()]
    lines += ["", "Made by:", "", "```", summary.get("command", "caffe bundle"), "```", "",
              "Use it:", "", "```", "classify --bundle . IMAGE [--json]",
              "caffe score --bundle . FOLDER_OF_CLASS_FOLDERS", "```", "",
              "```python", "import caffe_compat as caffe",
              "net = caffe.Classifier.from_bundle('path/to/bundle')",
              "print(net.top_k('photo.jpg', k=3))   # [(label, probability), ...]", "```", "",
              "`preprocess.json` records the training's TEST preprocessing exactly; "
              "`deploy.prototxt` and `weights.caffemodel` are plain Caffe files."]
    return "\n".join(lines) + "\n"


def write_bundle(out, *, train_val: caffe_pb2.NetParameter, source: str, weights: str,
                 labels: list[str], stored, mean_file: str | None, info: dict,
                 landmark_names: list[str] | None = None) -> dict:
    """Write bundle folder ``out`` (atomically); returns preprocess.json's content.

    ``stored`` is the C×H×W size of the database images; ``mean_file`` the mean the TEST
    layer subtracted; ``info`` goes into the model card (val_accuracy, dataset, command).
    A landmark model (a Data layer with a landmarks top) keeps its heatmap branch in the
    deploy net; preprocess.json names that blob (``heatmap_blob``) and ``landmark_names``.
    """
    layers = netedit.data_layers(train_val, source)
    transform = layers.test.transform_param
    crop = int(transform.crop_size)
    shape = [1, int(stored[0]), crop or int(stored[1]), crop or int(stored[2])]
    deploy = netedit.deploy_net(train_val, shape, source)
    spec = preprocess_spec(transform, stored, layers.data_top, shape, bool(mean_file))
    heatmaps = netedit.landmark_outputs(train_val, source)
    if heatmaps:        # a landmark model: where its heatmaps come out, and what they mean
        spec["heatmap_blob"] = heatmaps[0]
        spec["landmark_names"] = list(landmark_names or [])
    classes = netedit.num_output(netedit.classifier_layer(train_val, layers.label_top, source))
    if len(labels) < classes:
        raise CliError(f"{len(labels)} label(s) for a classifier with {classes} outputs; "
                       "give one label per class")
    if not os.path.isfile(weights):
        raise CliError(f"--weights {weights}: no such file")
    with atomic_path(out, is_dir=True) as tmp:
        tmp.mkdir(parents=True)
        write_text(tmp / DEPLOY, netedit.text(deploy, f"deploy net of {source}"))
        shutil.copyfile(weights, tmp / WEIGHTS)
        write_text(tmp / LABELS, "".join(f"{name}\n" for name in labels[:classes]))
        if mean_file:
            shutil.copyfile(mean_file, tmp / MEAN)
        write_text(tmp / PREPROCESS, json.dumps(spec, indent=2) + "\n")
        card = dict(info, labels=labels[:classes], input_shape=shape, resize=spec["resize"])
        write_text(tmp / "README.md", model_card(card))
        _check_loads(tmp)
    return spec


def _check_loads(folder: Path) -> None:
    """The bundle must load as a classifier (every layer filled) before it is published."""
    from caffe_compat.classifier import Classifier
    Classifier.from_bundle(folder)


def _stored_shape(db_path: str, backend: int) -> tuple[int, int, int]:
    """C×H×W of the first record of a database (the size every image was stored at)."""
    from caffe_compat.data.db import open_db
    from caffe_compat.formats.datum import decode_datum
    if not os.path.exists(db_path):
        raise CliError(f"{db_path}: the TEST database does not exist (the preprocessing "
                       "is read from it)")
    with open_db(db_path, "lmdb" if backend == caffe_pb2.DataParameter.LMDB else "leveldb") as db:
        for key, value in db.items():
            image, _, _ = decode_datum(value, where=f"{db_path}: record {key!r}")
            return tuple(int(d) for d in image.shape)
    raise CliError(f"{db_path}: the TEST database is empty")


def _find_labels(db_path: str) -> str:
    for folder in (Path(db_path).parent, Path(db_path).parent.parent):
        if (folder / LABELS).is_file():
            return os.fspath(folder / LABELS)
    raise CliError(f"no labels.txt beside the TEST database {db_path} or in its parent "
                   "folder: pass --labels FILE (one class name a line)")


def bundle_from_solver(solver: str, weights: str, out, labels_file: str | None = None,
                       info: dict | None = None,
                       landmark_names: list[str] | None = None) -> dict:
    """A bundle from a ``caffe train`` run's solver and a caffemodel it wrote."""
    from caffe_compat.engine.solver.params import read_solver_param, train_net_spec
    param = read_solver_param(solver)
    spec = train_net_spec(param, solver)
    net = spec.param
    layers = netedit.data_layers(net, spec.source)
    test = layers.test
    if test.type != "Data":
        raise CliError(f"{spec.source}: the TEST data layer '{test.name}' is {test.type}; "
                       "caffe bundle reads the stored size from a Data layer's database")
    stored = _stored_shape(test.data_param.source, test.data_param.backend)
    labels_file = labels_file or _find_labels(test.data_param.source)
    mean = test.transform_param.mean_file if test.transform_param.HasField("mean_file") else None
    if mean and not os.path.isfile(mean):
        raise CliError(f"{spec.source}: mean_file {mean} does not exist")
    info = dict(info or {})
    info.setdefault("command", f"caffe bundle --solver {solver} --weights {weights} --out {out}")
    info.setdefault("name", net.name or Path(out).name)
    return write_bundle(out, train_val=net, source=spec.source, weights=weights,
                        labels=read_labels_file(labels_file), stored=stored, mean_file=mean,
                        info=info, landmark_names=landmark_names)


_LOADED: dict = {}


def top_k(bundle, image, k: int = 5) -> list[tuple[str, float]]:
    """[(label, probability), ...] for one image file or OpenCV uint8 array, the ``k`` most
    probable first. The bundle's classifier is loaded once and kept while its weights file
    is unchanged (for a server answering one image at a time)."""
    from caffe_compat.classifier import Classifier
    from caffe_compat.data.bundle import bundle_files
    weights = bundle_files(bundle)["weights"]
    key = (os.fspath(Path(bundle).resolve()), weights.stat().st_mtime_ns)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = Classifier.from_bundle(bundle)
    return _LOADED[key].top_k(image, k)


def main(args: argparse.Namespace) -> int:
    bundle_from_solver(args.solver, args.weights, args.out, args.labels)
    say(f"wrote {os.path.abspath(args.out)}: {DEPLOY}, {WEIGHTS}, {LABELS}, {PREPROCESS}, "
        "README.md")
    return 0


__all__ = ["add_arguments", "write_bundle", "top_k", "bundle_from_solver", "preprocess_spec",
           "model_card", "main"]
