"""``caffe fit``: a folder of class sub-folders (or a ``caffe dataset`` folder) → a trained
classifier bundle, through the same solver loop as ``caffe train``.

    caffe fit FOLDER|DATASET --model NAME|TRAIN_VAL.prototxt --out DIR [--epochs N]
              [--precision auto|fp32|bf16|fp16] [--weights W.caffemodel] [--resume]
              [--resize H W] [--val-percent P | --per-class 40/10] [--seed S]
              [--batch-size N] [--base-lr LR] [--solver-type SGD|Adam|...]
              [--threads N|auto] [--gpu 0]

NAME is a folder of models/ (alexnet_64, vgg16_64, ...) or a train_val prototxt with Data
layers. A landmark model (a Data layer with a third ``landmarks`` top, vgg16_landmark_64)
trains on a FOLDER holding a DeepFashion ``list_landmarks.txt`` or a DATASET built with
``--landmarks``; its bundle keeps the heatmap branch. DIR receives:

- ``dataset/``: the data set (``caffe dataset``) when given a FOLDER; the images are stored at
  ``--resize`` (default: the model's crop plus an eighth, 72×72 for a 64×64 crop);
- ``train_val.prototxt``: the model reading that data set, its classifier sized to the class
  count (renamed ``<name>_fit`` at lr_mult 10/20 when fine-tuning from ``--weights``, so the
  pretrained file leaves it at its fillers; a model whose solver names ``weights:``, as
  models/*_finetune do, fine-tunes from those unless ``--weights`` says otherwise);
  ``solver.prototxt``: the model's solver settings (base_lr a tenth when fine-tuning with a
  from-scratch solver) over ``--epochs`` epochs, the learning rate falling
  linearly to 0 at the last iteration ("poly", power 1), gradients clipped at an L2 norm of 10
  unless the model's solver says otherwise, batches small enough for 20 updates per epoch
  (batch 4 at least), a test on the whole validation set after every epoch, snapshots under
  ``snapshots/fit``;
- ``train.log`` (glog lines), ``snapshots/fit.metrics.jsonl`` and ``snapshots/fit.png`` (the
  live plot), as ``caffe train`` writes them;
- ``bundle/``: deploy net, weights, labels, preprocessing and model card (``caffe bundle``);
- ``fit.json``: status (running, done, stopped, failed), validation accuracy, the paths.

Ctrl-C stops after a snapshot (Caffe's SIGINT effect); ``--resume`` continues from the newest
snapshot in DIR/snapshots with the files already there (``--epochs`` may extend the run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time
from pathlib import Path

from caffe_compat.commands import dataset as datasets, device as devices, netedit
from caffe_compat.commands.bundle import write_bundle
from caffe_compat.commands.common import CliError, add_debug_flag, say
from caffe_compat.commands.model_library import model_files, model_weights
from caffe_compat.formats.atomic import write_text
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

DEFAULT_EPOCHS = 30
# Small data sets: smaller batches, so that an epoch has at least 20 updates (96 photos: batch
# 4, 24 updates; 400: the model's 20). With 10 per epoch (batch 9) alexnet_64 on 96 shape
# photos reached 0.77 and 0.65 held-out on two seeds of five (README, fit).
MIN_ITERATIONS_PER_EPOCH = 20
MIN_BATCH = 4
# The learning rate falls linearly from base_lr to 0 at the run's last iteration (Caffe's
# "poly" at power 1): the run's length is known, and ending at a small rate lands in a
# minimum instead of rattling around it at base_lr.
LR_SCHEDULE = {"lr_policy": "poly", "power": 1.0}
# Where the model's solver sets none: clip_gradients 10 leaves the usual steps alone (their
# L2 norm stays under 10 on alexnet_64) and scales down the rare spike (norms 28-92) that
# otherwise blew 96-photo fits up to NaN on 2 seeds of 5 (README, fit).
SOLVER_DEFAULTS = {"base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
                   "clip_gradients": 10.0}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("source", metavar="FOLDER|DATASET",
                    help="class sub-folders of images, or a caffe dataset folder")
    ap.add_argument("--model", required=True, metavar="NAME|PROTOTXT",
                    help="a models/ folder name (e.g. alexnet_64) or a train_val prototxt")
    ap.add_argument("--out", required=True, metavar="DIR", help="the run folder")
    ap.add_argument("--epochs", type=int, help=f"passes over the training set "
                                               f"(default {DEFAULT_EPOCHS})")
    ap.add_argument("--precision", choices=devices.PRECISION_CHOICES, default="fp32",
                    help="fp32 (default), bf16/fp16 autocast, or auto (probe-chosen)")
    ap.add_argument("--weights", metavar="W.caffemodel",
                    help="fine-tune: start from these weights (the classifier is renamed and "
                         "learned afresh)")
    ap.add_argument("--resume", action="store_true",
                    help="continue DIR's run from its newest snapshot")
    ap.add_argument("--resize", nargs=2, type=int, metavar=("H", "W"),
                    help="stored image size when building the data set (default: the model's "
                         "crop + 1/8)")
    split = ap.add_mutually_exclusive_group()
    split.add_argument("--val-percent", "--val_percent", dest="val_percent", type=float,
                       help="validation share of each class (default 20)")
    split.add_argument("--per-class", "--per_class", dest="per_class", metavar="TRAIN/VAL",
                       help="fixed train/val counts per class, e.g. 40/10")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the split and of the solver (default 0)")
    ap.add_argument("--backend", choices=("lmdb", "leveldb"), default="lmdb")
    ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                    help="training batch (default: the model's, smaller for small data sets "
                         f"so an epoch has at least {MIN_ITERATIONS_PER_EPOCH} updates)")
    ap.add_argument("--base-lr", "--base_lr", dest="base_lr", type=float,
                    help="starting learning rate, falling linearly to 0 at the end of the "
                         "run (default: the model's solver; a tenth when fine-tuning)")
    ap.add_argument("--solver-type", "--solver_type", dest="solver_type",
                    choices=("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"),
                    help="the solver (default: the model's)")
    ap.add_argument("--threads", default="auto", metavar="N|auto",
                    help="CPU threads: auto (default) takes one when other work already keeps "
                         "every core busy (two OpenMP threads fighting other processes ran this "
                         "flow 10x slower), else all")
    ap.add_argument("--gpu", metavar="0", help="train on this CUDA device (default CPU)")
    ap.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                    help="the progress bar: on a terminal only (default), always, never")
    add_debug_flag(ap)


# ----------------------------------------------------------------------------- the model


def default_resize(net: caffe_pb2.NetParameter, source: str) -> tuple[int, int]:
    """The model's crop plus an eighth for jitter (64 → 72), or the data set default."""
    crop = netedit.data_layers(net, source).test.transform_param.crop_size
    return (crop + crop // 8,) * 2 if crop else datasets.DEFAULT_RESIZE


def _dataset(args, out: Path, net, net_source: str) -> tuple[Path, dict]:
    """The DATASET folder to train on: given, already in DIR (resume), or built now."""
    if datasets.is_dataset(args.source):
        if args.resize or args.val_percent is not None or args.per_class:
            raise CliError(f"{args.source} is a built data set: --resize, --val-percent and "
                           "--per-class apply only when fit builds one from a folder")
        return Path(args.source), datasets.read_dataset(args.source)
    folder = out / "dataset"
    if args.resume and datasets.is_dataset(folder):
        return folder, datasets.read_dataset(folder)
    resize = tuple(args.resize) if args.resize else default_resize(net, net_source)
    marks = Path(args.source) / datasets.LANDMARK_FILE
    wants_marks = netedit.data_layers(net, net_source).landmark_top is not None
    say(f"building the data set of {os.path.abspath(args.source)} in {folder.resolve()}")
    summary = datasets.build_dataset(args.source, folder, resize=resize,
                                     val_percent=args.val_percent, per_class=args.per_class,
                                     seed=args.seed, backend=args.backend,
                                     landmarks=marks if wants_marks and marks.is_file() else None)
    datasets.report(summary, folder)
    return folder, summary


def _test_batch(n_val: int) -> tuple[int, int]:
    """(batch, iterations) that cover the validation set exactly once where possible."""
    if n_val <= 128:
        return n_val, 1
    for batch in range(100, 19, -1):
        if n_val % batch == 0:
            return batch, n_val // batch
    return 50, math.ceil(n_val / 50)


def plan(summary: dict, model_batch: int, epochs: int, batch: int | None) -> dict:
    """Batch sizes and iteration counts for ``epochs`` epochs over the data set."""
    n_train, n_val = int(summary["train_count"]), int(summary["val_count"])
    train_batch = batch or max(MIN_BATCH, min(model_batch, n_train // MIN_ITERATIONS_PER_EPOCH))
    per_epoch = max(1, math.ceil(n_train / train_batch))
    test_batch, test_iter = _test_batch(n_val)
    return {"train_batch": train_batch, "iterations_per_epoch": per_epoch,
            "max_iter": per_epoch * epochs, "test_batch": test_batch, "test_iter": test_iter}


def write_net(args, out: Path, data_dir: Path, summary: dict, net, source: str, sizes) -> None:
    files = summary["files"]
    resize = summary["resize"]
    crop = netedit.data_layers(net, source).test.transform_param.crop_size
    if crop and (crop > resize[0] or crop > resize[1]):
        raise CliError(f"the model crops {crop}×{crop} but the data set stores "
                       f"{resize[0]}×{resize[1]} images; rebuild it with --resize of at least "
                       f"{crop} {crop}")
    dbs = {0: os.fspath((data_dir / files["train_db"]).resolve()),
           1: os.fspath((data_dir / files["val_db"]).resolve())}
    netedit.point_data(net, dbs, summary["backend"],
                       os.fspath((data_dir / files["mean"]).resolve()),
                       {0: sizes["train_batch"], 1: sizes["test_batch"]}, source)
    classifier = netedit.classifier_layer(net, netedit.data_layers(net, source).label_top,
                                          source).name
    netedit.set_classes(net, len(summary["classes"]), source,
                        rename_to=f"{classifier}_fit" if args.weights else None)
    write_text(out / "train_val.prototxt",
               netedit.text(net, f"caffe fit: {source} on {data_dir.resolve()}"))


def write_solver(args, out: Path, solver_file: Path | None, sizes: dict) -> None:
    from caffe_compat.engine.solver.params import read_solver_param
    base = read_solver_param(os.fspath(solver_file)) if solver_file else None
    param = caffe_pb2.SolverParameter()
    for name in ("type", "lr_policy", "momentum", "momentum2", "delta", "rms_decay",
                 "weight_decay", "regularization_type", "base_lr",
                 "clip_gradients"):
        if base is not None and base.HasField(name):
            setattr(param, name, getattr(base, name))
    for name, value in SOLVER_DEFAULTS.items():
        if base is None or not base.HasField(name):
            setattr(param, name, value)
    for name, value in LR_SCHEDULE.items():   # the model's schedule was for another length
        setattr(param, name, value)
    if args.weights and not (base is not None and base.weights):
        param.base_lr = param.base_lr / 10     # a fine-tuning solver has its own rate already
    if args.solver_type:
        param.type = args.solver_type
    if args.base_lr is not None:
        param.base_lr = args.base_lr
    param.net = os.fspath((out / "train_val.prototxt").resolve())
    epoch = sizes["iterations_per_epoch"]
    param.test_iter.append(sizes["test_iter"])
    param.test_interval = epoch
    param.display = epoch
    param.max_iter = sizes["max_iter"]
    param.snapshot = max(epoch, math.ceil(sizes["max_iter"] / 10))
    param.snapshot_prefix = os.fspath((out / "snapshots" / "fit").resolve())
    param.random_seed = args.seed
    param.solver_mode = caffe_pb2.SolverParameter.CPU
    if args.weights:
        param.weights.append(os.fspath(Path(args.weights).resolve()))
    write_text(out / "solver.prototxt", netedit.text(param, "caffe fit: the solver"))


def _set_epochs(out: Path, epochs: int) -> None:
    """--resume --epochs N: move max_iter of the written solver to N epochs (the linear decay
    then runs to the new end: the rate goes back up to what N epochs give at this iteration)."""
    from caffe_compat.engine.solver.params import read_solver_param
    param = read_solver_param(os.fspath(out / "solver.prototxt"))
    param.max_iter = param.test_interval * epochs
    write_text(out / "solver.prototxt", netedit.text(param, "caffe fit: the solver"))


# ----------------------------------------------------------------------------- the run


def _record(out: Path, **fields) -> dict:
    """Update DIR/fit.json (atomically) with ``fields``; returns the whole record."""
    path = out / "fit.json"
    record = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            record = {}
    record.update(fields)
    write_text(path, json.dumps(record, indent=2) + "\n")
    return record


def _paths(out: Path) -> dict:
    snaps = out / "snapshots"
    return {"train_val": "train_val.prototxt", "solver": "solver.prototxt", "log": "train.log",
            "metrics": os.fspath(Path("snapshots") / "fit.metrics.jsonl"),
            "plot": os.fspath(Path("snapshots") / "fit.png"), "snapshots": snaps.name,
            "bundle": "bundle"}


def choose_threads(value: str) -> int:
    """--threads: a number, or auto: 1 when the 1-minute load average is already at the core
    count (a second OpenMP thread would only wait for a core), else every core."""
    cores = os.cpu_count() or 1
    if value != "auto":
        if not str(value).isdigit() or int(value) < 1:
            raise CliError(f"--threads {value}: expected a positive number or auto")
        return int(value)
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return 1 if busy else cores


def _train(out: Path, args, resume: bool, threads: int):
    """One run of ``caffe train``'s engine on DIR's solver (the one solver loop)."""
    import torch
    from caffe_compat.commands import train as train_cmd
    from caffe_compat.formats import glog
    ap = argparse.ArgumentParser()
    train_cmd.add_arguments(ap)
    argv = ["--solver", os.fspath(out / "solver.prototxt"), "--log", os.fspath(out / "train.log"),
            "--metrics", os.fspath(out / "snapshots" / "fit.metrics.jsonl"),
            "--plot-path", os.fspath(out / "snapshots" / "fit.png"),
            "--precision", args.precision, "--progress", args.progress]
    if args.gpu is not None:
        argv += ["--gpu", args.gpu]
    if resume:
        argv += ["--snapshot", "auto"]
    before = torch.get_num_threads()
    if args.gpu is None:
        torch.set_num_threads(threads)
        glog.info(f"caffe fit: {threads} CPU thread(s) (--threads {args.threads})",
                  "caffe.cpp:200")
    try:
        return train_cmd.train(ap.parse_args(argv))
    finally:
        torch.set_num_threads(before)      # a Python caller's setting outlives the run


def _final_weights(out: Path, result) -> str | None:
    """A resumed run that had already reached max_iter writes no snapshot: its weights are
    the snapshot of that iteration."""
    path = out / "snapshots" / f"fit_iter_{result.solver.iter}.caffemodel"
    return os.fspath(path) if path.is_file() else None


def _val_accuracy(result) -> float | None:
    last = result.tests.last.get(0) if result.tests is not None else None
    if last is None or "accuracy" not in last.scores:
        return None
    return float(last.scores["accuracy"][0])


def prepare(args, out: Path) -> dict:
    """Everything before training: data set, train_val, solver; returns the run's facts."""
    if args.resume and args.weights:
        raise CliError("--resume continues from DIR's snapshots; --weights starts a new "
                       "fine-tuning run (give one)")
    if args.resume and (out / "solver.prototxt").is_file():
        if args.epochs:
            _set_epochs(out, args.epochs)
        record = _record(out)
        return {"dataset": Path(record.get("dataset", out / "dataset")),
                "summary": datasets.read_dataset(record.get("dataset", out / "dataset"))}
    if args.epochs is not None and args.epochs < 1:
        raise CliError(f"--epochs must be at least 1 (got {args.epochs})")
    if args.weights and not os.path.isfile(args.weights):
        raise CliError(f"--weights {args.weights}: no such file")
    train_val, solver_file = model_files(args.model)
    pretrained = model_weights(solver_file)
    if pretrained is not None and not args.weights:
        if not pretrained.is_file():
            raise CliError(f"{solver_file}: the model fine-tunes from weights {pretrained}, "
                           "which does not exist (its readme says how it is made), or pass "
                           "--weights")
        args.weights = os.fspath(pretrained)
    net = read_text_proto(os.fspath(train_val), caffe_pb2.NetParameter)
    netedit.data_layers(net, os.fspath(train_val))          # fail before building data
    out.mkdir(parents=True, exist_ok=True)
    data_dir, summary = _dataset(args, out, net, os.fspath(train_val))
    layers = netedit.data_layers(net, os.fspath(train_val))
    if layers.landmark_top and not summary.get("landmarks"):
        raise CliError(f"{train_val}: the model reads landmarks (data layer top "
                       f"'{layers.landmark_top}') but the data set at {data_dir} has none: "
                       "build it with caffe dataset --landmarks FILE (or put a "
                       f"{datasets.LANDMARK_FILE} in the image folder)")
    model_batch = (layers.train or layers.test).data_param.batch_size or 32
    sizes = plan(summary, model_batch, args.epochs or DEFAULT_EPOCHS, args.batch_size)
    write_net(args, out, data_dir, summary, net, os.fspath(train_val), sizes)
    write_solver(args, out, solver_file, sizes)
    (out / "snapshots").mkdir(exist_ok=True)
    _record(out, status="prepared", model=args.model, dataset=os.fspath(data_dir.resolve()),
            epochs=args.epochs or DEFAULT_EPOCHS, classes=summary["classes"], plan=sizes,
            paths=_paths(out), command=getattr(args, "command", None))
    return {"dataset": data_dir, "summary": summary}


def fit(args: argparse.Namespace) -> dict:
    """Run ``caffe fit`` for parsed ``args``; returns fit.json's content."""
    out = Path(args.out)
    threads = choose_threads(getattr(args, "threads", "auto"))
    facts = prepare(args, out)
    started = time.time()
    _record(out, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            pid=os.getpid())
    try:
        return _finish(out, args, facts, _train(out, args, args.resume, threads), started)
    except BaseException as exc:
        _record(out, status="failed", error=str(exc) or type(exc).__name__)
        raise


def _finish(out: Path, args, facts: dict, result, started: float) -> dict:
    """After training: fit.json, and the bundle when the run completed."""
    fields = {"iterations": result.solver.iter, "seconds": round(time.time() - started, 1),
              "val_accuracy": _val_accuracy(result)}
    weights = result.snapshots[-1][0] if result.snapshots else _final_weights(out, result)
    if result.stopped_early or weights is None:
        return _record(out, status="stopped", **fields,
                       resume=f"caffe fit {shlex.quote(args.source)} --model "
                              f"{shlex.quote(args.model)} --out {shlex.quote(args.out)} --resume")
    summary = facts["summary"]
    net = read_text_proto(os.fspath(out / "train_val.prototxt"), caffe_pb2.NetParameter)
    mean = os.fspath(Path(facts["dataset"]) / summary["files"]["mean"])
    uses_mean = netedit.data_layers(net, "train_val").test.transform_param.HasField("mean_file")
    write_bundle(out / "bundle", train_val=net, source=os.fspath(out / "train_val.prototxt"),
                 weights=weights, labels=summary["classes"],
                 stored=(summary.get("channels", 3), *summary["resize"]),
                 mean_file=mean if uses_mean else None,
                 info={"val_accuracy": fields["val_accuracy"], "dataset": summary,
                       "model": args.model,
                       "name": Path(args.out).name, "command": getattr(args, "command", None)
                       or "caffe fit"},
                 landmark_names=(summary.get("landmarks") or {}).get("names"))
    return _record(out, status="done", weights=os.fspath(Path(weights).resolve()), **fields)


def fit_args(source, out, model: str, **options) -> argparse.Namespace:
    """The parsed arguments of ``caffe fit SOURCE --model MODEL --out OUT`` plus ``options``
    given by their dest names (epochs=10, precision="bf16", resume=True, ...), for callers
    in Python: ``fit(fit_args("photos", "runs/x", "alexnet_64", epochs=10))``."""
    ap = argparse.ArgumentParser(prog="caffe fit")
    add_arguments(ap)
    args = ap.parse_args([os.fspath(source), "--model", model, "--out", os.fspath(out)])
    unknown = set(options) - set(vars(args))
    if unknown:
        raise CliError(f"caffe fit has no option(s) {', '.join(sorted(unknown))}")
    for name, value in options.items():
        setattr(args, name, value)
    return args


def main(args: argparse.Namespace) -> int:
    args.command = getattr(args, "command_line", None)
    record = fit(args)
    if record["status"] != "done":
        say(f"stopped at iteration {record['iterations']}; continue with: {record['resume']}")
        return 0
    acc = record.get("val_accuracy")
    say(f"done: validation accuracy {acc:.4f}" if acc is not None else "done")
    say(f"bundle: {(Path(args.out) / 'bundle').resolve()}")
    return 0


__all__ = ["add_arguments", "fit", "fit_args", "prepare", "plan", "model_files",
           "model_weights", "main"]
