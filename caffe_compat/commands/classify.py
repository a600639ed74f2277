"""``classify``: Caffe's python/classify.py with a readable report.

    classify INPUT [OUTPUT.npy] --model_def deploy.prototxt --pretrained_model W.caffemodel
             [--center_only] [--images_dim 256,256] [--mean_file mean.npy|mean.binaryproto]
             [--input_scale S] [--raw_scale 255] [--channel_swap 2,1,0] [--ext jpg] [--gpu]
             [--labels synset_words.txt] [--top_k 5] [--format table|json] [--batch_size 64]

INPUT is an image, a folder (its ``*.EXT`` images, sorted), a text file listing one image
path per line, or a .npy array of (H, W, K) images. Predictions are caffe.Classifier's
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
from caffe_compat.engine import mode
from caffe_compat.formats import atomic
from caffe_compat.formats.blob_io import ProtoError, read_blobproto


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="classify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input_file", help="image, folder, image list (.txt) or .npy")
    ap.add_argument("output_file", nargs="?", help="save the predictions here (.npy)")
    ap.add_argument("--model_def", required=True, help="deploy prototxt")
    ap.add_argument("--pretrained_model", required=True, help="trained .caffemodel (or .h5)")
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
    names, array = list_inputs(args.input_file, args.ext)
    if not names:
        raise ValueError(f"{args.input_file}: no images found")
    net = Classifier(args.model_def, args.pretrained_model,
                     image_dims=[int(s) for s in args.images_dim.split(",")],
                     mean=load_mean(args.mean_file), input_scale=args.input_scale,
                     raw_scale=args.raw_scale,
                     channel_swap=[int(s) for s in args.channel_swap.split(",")]
                     if args.channel_swap else None, engine=args.engine)
    step = max(1, args.batch_size)
    chunks = []
    for start in range(0, len(names), step):
        images = array[start:start + step] if array is not None else \
            [caffe_io.load_image(p) for p in names[start:start + step]]
        chunks.append(net.predict(list(images), not args.center_only))
    return names, np.concatenate(chunks)


def report(names, predictions, args) -> str:
    labels = read_labels(args.labels)
    tops = [top_classes(p, args.top_k, labels) for p in predictions]
    if args.format == "json":
        return json.dumps([{"image": n, "top": t} for n, t in zip(names, tops)], indent=2)
    lines = []
    for name, top in zip(names, tops):
        lines.append(name)
        lines += [f"  {t['probability']:.4f}  {t['label']}" for t in top]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mode.set_mode_gpu() if args.gpu else mode.set_mode_cpu()
        apply_threads(args)
        names, predictions = classify(args)
    except (OSError, ValueError, ProtoError, RuntimeError) as exc:
        print(f"error: classify: {exc}", file=sys.stderr)
        return 1
    if args.output_file:
        target = args.output_file if args.output_file.endswith(".npy") \
            else args.output_file + ".npy"                      # as np.save names it
        with atomic.atomic_write(target, "wb") as f:
            np.save(f, predictions)
    print(report(names, predictions, args))
    return 0
