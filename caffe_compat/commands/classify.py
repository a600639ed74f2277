"""``classify``: Caffe's python/classify.py with a readable report.

    classify INPUT [OUTPUT.npy] --model_def deploy.prototxt --pretrained_model W.caffemodel
             [--center_only] [--images_dim 256,256] [--mean_file mean.npy|mean.binaryproto]
             [--input_scale S] [--raw_scale 255] [--channel_swap 2,1,0] [--ext jpg] [--gpu]
             [--labels synset_words.txt] [--top_k 5] [--format table|json] [--batch_size 64]

    classify --bundle B INPUT [--json] [--top_k 5]

INPUT is an image, a folder (its ``*.EXT`` images, sorted), a text file listing one image
path per line, or a .npy array of (H, W, K) images. With ``--bundle B`` (a folder made by
``caffe fit`` or ``caffe bundle``) the model, weights, labels and preprocessing all come from
the bundle: every image gets exactly the training's TEST preprocessing (stored size, mean,
centre crop, scale); a folder's images of every extension are read, and a list whose lines
carry labels (``path label``) also gets the accuracy. Predictions are caffe.Classifier's
(ten-crop average unless --center_only); OUTPUT.npy, when given, receives them as Caffe's
script saves them. The report gives each image's top-k classes with probabilities, named by
the labels file (one label per line, class index = line number) when given. Images are
loaded and classified --batch_size at a time. Unlike Caffe's script there is no default
model or ImageNet mean: name them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from caffe_compat import io as caffe_io
from caffe_compat.classifier import Classifier
from caffe_compat.commands.common import add_engine_arguments, apply_threads
from caffe_compat.engine import mode, weights
from caffe_compat.formats import atomic
from caffe_compat.formats.blob_io import ProtoError, read_blobproto


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="classify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input_file", help="image, folder, image list (.txt) or .npy")
    ap.add_argument("output_file", nargs="?", help="save the predictions here (.npy)")
    ap.add_argument("--bundle", metavar="B",
                    help="a model bundle folder: model, weights, labels and preprocessing")
    ap.add_argument("--json", action="store_true", help="the same as --format json")
    ap.add_argument("--allow-missing-weights", "--allow_missing_weights",
                    dest="allow_missing_weights", action="store_true",
                    help="classify even if the weights leave layers with parameters at their "
                         "random initial values (default: an error naming them)")
    ap.add_argument("--model_def", help="deploy prototxt (required without --bundle)")
    ap.add_argument("--pretrained_model",
                    help="trained .caffemodel or .h5 (required without --bundle)")
    ap.add_argument("--gpu", action="store_true", help="compute on the GPU")
    ap.add_argument("--center_only", action="store_true",
                    help="centre crop only instead of the ten-crop average")
    ap.add_argument("--images_dim", default="256,256", help="'height,width' images are resized to")
    ap.add_argument("--mean_file", default="", help="mean as .npy (C,H,W) or .binaryproto")
    ap.add_argument("--input_scale", type=float, help="scale after mean subtraction")
    ap.add_argument("--raw_scale", type=float, default=255.0, help="scale of the [0,1] image")
    ap.add_argument("--channel_swap", default="2,1,0", help="channel order (RGB -> BGR)")
    ap.add_argument("--ext", default="jpg", help="image extension for a folder input")
    ap.add_argument("--labels", help="text file, one class label per line")
    ap.add_argument("--top_k", type=int, default=5, help="classes reported per image")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    ap.add_argument("--batch_size", type=int, default=64, help="images loaded at a time")
    add_engine_arguments(ap)
    return ap


def load_mean(path: str):
    """A mean for Transformer.set_mean from .npy or a (1, C, H, W) .binaryproto."""
    if not path:
        return None
    if path.endswith(".npy"):
        return np.load(path)
    mean = read_blobproto(path)
    return mean[0] if mean.ndim == 4 else mean


def list_inputs(path: str, ext: str):
    """(names, array or None): image paths, or the .npy array itself."""
    path = os.path.expanduser(path)
    if path.endswith("npy"):
        array = np.load(path)
        return [f"{path}[{i}]" for i in range(len(array))], array
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*." + ext))), None
    if path.endswith(".txt"):
        with open(path) as f:
            base = os.path.dirname(path)
            lines = [line.split()[0] for line in f if line.strip()]
        return [p if os.path.isabs(p) or os.path.exists(p) else os.path.join(base, p)
                for p in lines], None
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such image, folder or list")
    return [path], None


def read_labels(path: str | None) -> list[str] | None:
    if not path:
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def top_classes(probs: np.ndarray, k: int, labels: list[str] | None) -> list[dict]:
    flat = np.asarray(probs).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i] if labels and i < len(labels) else str(i),
             "probability": float(flat[i])} for i in order]


def classify(args) -> tuple[list[str], np.ndarray]:
    if not args.model_def or not args.pretrained_model:
        raise ValueError("give --model_def and --pretrained_model, or --bundle B")
    names, array = list_inputs(args.input_file, args.ext)
    if not names:
        raise ValueError(f"{args.input_file}: no images found")
    net = Classifier(args.model_def, None,
                     image_dims=[int(s) for s in args.images_dim.split(",")],
                     mean=checked_mean(args), input_scale=args.input_scale,
                     raw_scale=args.raw_scale,
                     channel_swap=[int(s) for s in args.channel_swap.split(",")]
                     if args.channel_swap else None)
    weights.copy_from(net.module, args.pretrained_model,
                      require_all=not args.allow_missing_weights)
    net._choose_engine(args.engine)           # on the trained weights
    step = max(1, args.batch_size)
    chunks = []
    for start in range(0, len(names), step):
        images = array[start:start + step] if array is not None else \
            [caffe_io.load_image(p) for p in names[start:start + step]]
        chunks.append(net.predict(list(images), not args.center_only))
    return names, np.concatenate(chunks)


def checked_mean(args):
    """--mean_file, refused when its size is neither the net's input nor --images_dim (a
    mean of other images would be stretched over these and shift every pixel)."""
    mean = load_mean(args.mean_file)
    if mean is None or mean.ndim != 3:
        return mean
    from caffe_compat.pycaffe import read_net_prototxt
    dims = tuple(int(s) for s in args.images_dim.split(","))
    net = read_net_prototxt(args.model_def)
    shapes = [tuple(s.dim[2:]) for layer in net.layer if layer.type == "Input"
              for s in layer.input_param.shape] or [tuple(net.input_dim[2:4])]
    if tuple(mean.shape[1:]) not in [dims] + shapes:
        size = "×".join(map(str, mean.shape))
        raise ValueError(f"{args.mean_file}: the mean is {size} (C×H×W) but the images are "
                         f"{'×'.join(map(str, dims))} (--images_dim) and the net's input is "
                         f"{' or '.join('×'.join(map(str, s)) for s in shapes)}")
    return mean


def _bundle_inputs(path: str) -> tuple[list[str], list[str | None]]:
    """(images, their label or None): an image, a folder (every image file) or a list."""
    from caffe_compat.data.split import IMAGE_EXTENSIONS
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS], []
    if path.endswith(".txt"):
        names, truth = [], []
        with open(path, encoding="utf-8") as f:
            for line in filter(str.strip, f):
                name, _, label = line.strip().rpartition(" ")
                name, label = (name, label) if name else (line.strip(), None)
                beside = os.path.join(os.path.dirname(path), name)
                names.append(beside if not os.path.isabs(name) and os.path.exists(beside)
                             else name)
                truth.append(label)
        return names, truth
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such image, folder or list")
    return [path], []


def classify_bundle(args):
    """(names, probabilities, labels, true labels) with the bundle's own preprocessing."""
    net = Classifier.from_bundle(args.bundle, allow_missing_weights=args.allow_missing_weights)
    net._choose_engine(args.engine)
    names, truth = _bundle_inputs(args.input_file)
    if not names:
        raise ValueError(f"{args.input_file}: no images found")
    return names, net.probabilities(names, args.batch_size), net.labels, truth


def _true_name(label: str | None, labels: list[str]) -> str | None:
    if label is not None and label.isdigit() and int(label) < len(labels):
        return labels[int(label)]
    return label


def report(names, predictions, args, labels=None, truth=()) -> str:
    labels = labels if labels is not None else read_labels(args.labels)
    if labels is not None and len(labels) < np.asarray(predictions).shape[1]:
        raise ValueError(f"{args.labels or 'labels.txt'}: {len(labels)} label(s) but the net "
                         f"has {np.asarray(predictions).shape[1]} outputs")
    tops = [top_classes(p, args.top_k, labels) for p in predictions]
    labelled = bool(truth) and all(t is not None and (t.isdigit() or t in (labels or []))
                                   for t in truth)
    truth = [_true_name(t, labels or []) for t in truth] if labelled else []
    if args.format == "json" or getattr(args, "json", False):
        return json.dumps([dict({"image": n, "top": t}, **({"true": truth[i]} if truth else {}))
                           for i, (n, t) in enumerate(zip(names, tops))], indent=2)
    lines = []
    for name, top in zip(names, tops):
        lines.append(name)
        lines += [f"  {t['probability']:.4f}  {t['label']}" for t in top]
    if truth:
        hits = sum(top[0]["label"] == t for top, t in zip(tops, truth))
        lines.append(f"accuracy {hits / len(truth):.4f} ({hits}/{len(truth)} listed labels)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mode.set_mode_gpu() if args.gpu else mode.set_mode_cpu()
        apply_threads(args)
        labels, truth = None, ()
        if args.bundle:
            names, predictions, labels, truth = classify_bundle(args)
        else:
            names, predictions = classify(args)
            if args.input_file.endswith(".txt"):      # a labelled list also gets an accuracy
                truth = _bundle_inputs(args.input_file)[1]
        text = report(names, predictions, args, labels, truth)
    except (OSError, ValueError, ProtoError, RuntimeError) as exc:
        print(f"error: classify: {exc}", file=sys.stderr)
        return 1
    if args.output_file:
        target = args.output_file if args.output_file.endswith(".npy") \
            else args.output_file + ".npy"                      # as np.save names it
        with atomic.atomic_write(target, "wb") as f:
            np.save(f, predictions)
    print(text)
    return 0
