"""Scale benchmark: a model (default vgg16_landmark_64) on the full Fashion-MNIST (60k/10k).

1. Builds the LMDBs once (kept): all 70,000 IDX images resized to --size × --size (default
   72, for the net's 64×64 crops; grey, or --color for 3 channels) with 8 silhouette landmarks
   per record, and the training-set mean — under data/fmnist_full_lmdb_<size>[_color]/.
2. Trains with --solver (default models/vgg16_landmark_64/solver_full.prototxt), the
   train_val's Data layers pointed at those LMDBs in memory, train batch --batch-size.
   --max-iter shortens the run (the solver's poly schedule then decays over the shorter run);
   --minutes stops training at a wall-clock budget whatever the schedule says. Every
   --test-every epochs it tests on the --test-images first test images; snapshots follow
   the solver file's `snapshot`, and `--resume` continues from one (the curves so far are
   kept in --work/curve.json).
3. Tests on the --test-images first test images (default all 10,000) and writes a report
   (--report, default results/fmnist_full.md, the same numbers as JSON and the curves as a
   PNG beside it): test accuracy, wall times, measured training images/s and what longer
   schedules would cost at that speed. The final snapshot goes to --work (default
   runs/fmnist_full).

Published anchors (Fashion-MNIST README benchmark): VGG16 93.5%, ResNet-18 94.9%.

Examples:
  python tools/full_fashion_mnist.py --max-iter 600 --threads 1      # ~8 min of fp32 training
  python tools/full_fashion_mnist.py --precision bf16 --threads 2     # the 25 epochs, ~1.6 h
  python tools/full_fashion_mnist.py --size 36 --solver \
      models/vgg16_landmark_32_bn/solver_full.prototxt --work runs/fmnist_full_bn \
      --report results/fmnist_full_bn.md --test-every 2   # the BatchNorm variant, 20 epochs
  python tools/full_fashion_mnist.py --resume \
      runs/fmnist_full/vgg16_landmark_64_iter_1874.solverstate
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from caffe_compat.engine.solver.events import (NONE, STOP, IterationDone, SnapshotWritten,
                                               TestDone)
from experiments.reproduce.protocol import NEVER

REPO = Path(__file__).resolve().parents[1]

DEFAULT_IDX = "/usr/share/datasets/fashion-mnist"
TARGET = 0.945


def add_speed_args(ap: argparse.ArgumentParser) -> None:
    """--precision and --layout, as this script and tools/pretrain.py take them."""
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                    help="fp32 (default, what Caffe computes), bf16 autocast of the forward "
                    "passes (weights, gradients and the solver stay fp32), or auto: bf16 "
                    "where this CPU has it natively and a short probe shows it faster")
    ap.add_argument("--layout", choices=("nchw", "nhwc", "auto"), default="nchw",
                    help="the convolutions' memory layout (default nchw; auto: nhwc where a "
                    "short probe at the chosen precision shows it faster)")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idx-dir", default=DEFAULT_IDX, help=f"IDX files (default {DEFAULT_IDX})")
    ap.add_argument("--size", type=int, default=72, help="stored side (default 72; must be >= "
                    "the net's crop_size)")
    ap.add_argument("--pad", type=int, default=0, help="black frame in pixels around each "
                    "stored image (default 0): the image is resized to SIZE - 2*PAD, so random "
                    "crops of that side shift the whole garment by up to PAD pixels")
    ap.add_argument("--color", action="store_true", help="3-channel records (default grey: "
                    "Fashion-MNIST is grey, three equal channels only cost time)")
    ap.add_argument("--db", default=None,
                    help="LMDB folder (default data/fmnist_full_lmdb_SIZE[_padPAD])")
    ap.add_argument("--solver", default=str(REPO / "models/vgg16_landmark_64/solver_full.prototxt"),
                    help="solver prototxt (default models/vgg16_landmark_64/solver_full.prototxt)")
    ap.add_argument("--batch-size", type=int, default=64, help="train batch (default 64)")
    ap.add_argument("--test-batch", type=int, default=100, help="test batch (default 100)")
    ap.add_argument("--test-images", type=int, default=10000,
                    help="test on the first N test images (default all 10,000)")
    ap.add_argument("--max-iter", type=int, default=None, help="override the solver's max_iter")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop training after this many minutes of training")
    ap.add_argument("--test-every", type=float, default=1.0,
                    help="test during training every this many epochs (default 1; 0: only "
                    "at the end)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_speed_args(ap)
    ap.add_argument("--resume", default=None, help="solverstate to continue from")
    ap.add_argument("--work", default=str(REPO / "runs" / "fmnist_full"),
                    help="snapshots and train.log (default runs/fmnist_full)")
    ap.add_argument("--report", default=str(REPO / "results" / "fmnist_full.md"),
                    help="markdown report (default results/fmnist_full.md; JSON beside it)")
    args = ap.parse_args(argv)
    if not 0 <= args.pad < args.size // 2:
        ap.error(f"--pad {args.pad}: must be at least 0 and leave an image inside the "
                 f"{args.size}-pixel record")
    for name in ("idx_dir", "db", "solver", "resume", "work", "report"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


# ------------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- solver


def db_folder(args) -> Path:
    """The LMDB folder of these arguments: --db, else data/fmnist_full_lmdb_SIZE[_padPAD][_color]."""
    return Path(args.db) if args.db else REPO / "data" / (
        f"fmnist_full_lmdb_{args.size}" + (f"_pad{args.pad}" if args.pad else "")
        + ("_color" if args.color else ""))


def record_count(db: Path) -> int:
    from caffe_compat.data.db import open_db
    with open_db(db) as reader:
        return len(reader)


def solver_param(args, db: Path, n_train: int, n_test: int):
    from experiments.reproduce.protocol import ProtocolError, SplitData, embed_net
    from caffe_compat.engine.solver.params import read_solver_param
    sp = read_solver_param(args.solver)
    if args.test_images > n_test:
        raise SystemExit(f"error: --test-images {args.test_images}: {db / 'test'} holds only "
                         f"{n_test} records")
    try:
        net_path = os.fspath(embed_net(sp, Path(args.solver), SplitData(
            db / "train", db / "test", db / "mean.binaryproto", n_train, n_test),
            args.batch_size, args.test_batch))
    except ProtocolError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.max_iter:
        sp.max_iter = args.max_iter
    del sp.test_iter[:]
    sp.test_iter.append(math.ceil(args.test_images / args.test_batch))
    sp.test_interval = NEVER          # this script tests on its own --test-every schedule
    Path(args.work).mkdir(parents=True, exist_ok=True)
    sp.snapshot_prefix = os.fspath(Path(args.work) / Path(sp.snapshot_prefix).name)
    return sp, net_path


# ----------------------------------------------------------------------------- curves


class Curve:
    """Per-iteration train losses, the tests so far and the training segments (one per
    invocation: iterations, seconds, threads), kept in --work/curve.json so that a resumed
    run reports the whole schedule and its whole cost. Saved at every snapshot and test."""

    def __init__(self, path: Path, start_iter: int):
        self.path = path
        self.train_loss: list[float] = []
        self.tests: list[dict] = []
        self.segments: list[dict] = []
        if start_iter and path.is_file():     # resuming: keep what led to that snapshot
            saved = json.loads(path.read_text(encoding="utf-8"))
            self.train_loss = saved["train_loss"][:start_iter]
            self.tests = [t for t in saved["tests"] if t["iter"] <= start_iter]
            self.segments = [clamp(seg, start_iter) for seg in saved.get("segments", [])
                             if seg["start"] < start_iter]
        # killed between a snapshot and the curve's save: those iterations' losses are lost
        self.train_loss += [math.nan] * (start_iter - len(self.train_loss))

    def save(self) -> None:
        from experiments.reproduce.protocol import write_json
        write_json(self.path, {"train_loss": self.train_loss, "tests": self.tests,
                               "segments": self.segments})


def clamp(segment: dict, last_iter: int) -> dict:
    """A segment cut at the snapshot a resumed run starts from (its time pro rata): what
    it trained past that snapshot was lost with the killed process."""
    if segment["end"] <= last_iter:
        return segment
    done = (last_iter - segment["start"]) / (segment["end"] - segment["start"])
    return segment | {"end": last_iter, "seconds": segment["seconds"] * done}


def deploy_for_records(deploy: Path, channels: int, out: Path) -> Path:
    """``deploy`` with its input's channel axis set to the records' (1 grey, 3 colour), at
    ``out``: the model folder's deploy declares 3 channels, and a net trained here on grey
    records has conv1 weights for 1, which that deploy cannot load."""
    from google.protobuf import text_format

    from caffe_compat.formats.blob_io import read_text_proto
    from caffe_compat.proto import caffe_pb2
    from experiments.reproduce.protocol import atomic_write_text
    net = read_text_proto(deploy, caffe_pb2.NetParameter)
    shapes = [lp.input_param.shape[0] for lp in net.layer
              if lp.type == "Input" and lp.input_param.shape] or list(net.input_shape)
    if not shapes or len(shapes[0].dim) < 2:
        raise ValueError(f"{deploy}: no Input blob with a channel axis to set")
    shapes[0].dim[1] = channels
    header = (f"# {os.path.relpath(deploy, REPO)} with {channels} input channel(s), for the "
              "snapshots of tools/full_fashion_mnist.py\n")
    atomic_write_text(out, header + text_format.MessageToString(net))
    return out


def train_crop(net_param) -> int:
    """The TRAIN Data layer's crop_size (the input side the net sees)."""
    from caffe_compat.proto import caffe_pb2
    return next(lp.transform_param.crop_size for lp in net_param.layer
                if lp.type == "Data" and any(r.phase == caffe_pb2.TRAIN for r in lp.include))


def test_once(solver, loss_top: str, acc_top: str) -> dict:
    """One test over the first --test-images images (Caffe's test net would go on reading
    where the last test stopped: with fewer than all, each test would see other images)."""
    solver.test_modules[0].seek_data(0)
    start = time.perf_counter()
    means = dict(zip(solver.test_modules[0].output_names, solver.test(0)))
    return {"iter": solver.iter, "accuracy": means[acc_top], "loss": means[loss_top],
            "seconds": time.perf_counter() - start}


class RunWatcher:
    """Observes the solver: train losses and tests into the curve, a tqdm bar, the
    wall-clock budget (an action source asking the loop to stop)."""

    def __init__(self, solver, curve: "Curve", tops: tuple[str, str], epoch_iters: float,
                 budget_seconds: float, command: str):
        from tqdm import tqdm
        self.solver, self.curve, self.tops, self.epoch_iters = solver, curve, tops, epoch_iters
        self.budget, self.train_seconds, self.test_seconds = budget_seconds, 0.0, 0.0
        self.bar = tqdm(total=solver.param.max_iter, initial=solver.iter, unit="iter",
                        dynamic_ncols=True, disable=not sys.stderr.isatty())
        import torch
        self.segment = {"start": solver.iter, "end": solver.iter, "seconds": 0.0,
                        "threads": torch.get_num_threads(), "command": command}
        curve.segments.append(self.segment)
        solver.subscribe(self.on_event, IterationDone, TestDone, SnapshotWritten)
        solver.add_action_source(self.over_budget)

    def close(self) -> None:
        self.solver.events.unsubscribe(self.on_event)
        self.solver.events.remove_action_source(self.over_budget)
        self.bar.close()

    def over_budget(self) -> str:
        return STOP if self.train_seconds >= self.budget else NONE

    def on_event(self, event) -> None:
        if isinstance(event, IterationDone):
            self.train_seconds += event.seconds
            self.segment["end"], self.segment["seconds"] = event.iter, self.train_seconds
            self.curve.train_loss.append(event.outputs[self.tops[0]][0])
            self.bar.update(event.iter - self.bar.n)
            if event.iter % 10 == 0:
                self.bar.set_postfix(loss=f"{np.nanmean(self.curve.train_loss[-50:]):.3f}",
                                     lr=f"{event.lr:.2g}")
        elif isinstance(event, TestDone) and event.net_id == 0:
            self.test_seconds += event.seconds
            point = {"iter": event.iter, "accuracy": event.scalar(self.tops[1]),
                     "loss": event.scalar(self.tops[0]), "seconds": event.seconds}
            self.curve.tests.append(point)
            self.curve.save()
            self.bar.write(f"iteration {event.iter} (epoch {event.iter / self.epoch_iters:.1f})"
                           f": test accuracy {point['accuracy'] * 100:.2f}%, "
                           f"loss {point['loss']:.3f}")
        elif isinstance(event, SnapshotWritten):
            self.curve.save()


def resolve_layout(device, layout: str, precision: str, where: str) -> tuple[str, str]:
    """``--layout`` as this machine resolves it (``auto``: what a short probe at
    ``precision`` on ``device`` picks), logged as coming from ``where``; returns the layout
    and why."""
    from caffe_compat.engine.layout import AUTO, decide_layout
    from caffe_compat.formats import glog
    reason = f"{layout}: --layout {layout}"
    if layout == AUTO:
        decision = decide_layout(device, precision)
        layout, reason = decision.layout, decision.reason
    glog.info(f"--layout {reason}", where)
    return layout, reason


def use_layout(solver, layout: str, precision: str) -> tuple[str, str]:
    """Store the train net's convolution weights in ``layout`` (``auto``: what a short probe
    at ``precision`` picks); returns the layout and why."""
    from caffe_compat.engine.layout import apply_layout
    layout, reason = resolve_layout(solver.device, layout, precision, "full_fashion_mnist.py")
    apply_layout(solver.train_module, layout)
    return layout, reason


def train(solver, args, tops: tuple[str, str], curve: "Curve", epoch_iters: float,
          command: str = "") -> dict:
    """The engine's loop to max_iter (or the --minutes budget), testing every --test-every
    epochs on the first --test-images images, snapshotting on the solver file's schedule."""
    budget = args.minutes * 60 if args.minutes is not None else math.inf
    test_every = max(1, round(args.test_every * epoch_iters)) if args.test_every > 0 else 0
    solver.param.test_interval = test_every if test_every else NEVER
    solver.param.test_initialization = False
    solver.test_from_first_batch = True
    start_iter = solver.iter
    watcher = RunWatcher(solver, curve, tops, epoch_iters, budget, command)
    try:
        if budget > 0:
            solver.step(solver.param.max_iter - solver.iter)
    finally:
        watcher.close()
    solver.requested_early_exit = False      # the budget's stop must not cancel the last test
    seconds, iters = watcher.train_seconds, solver.iter - start_iter
    images = iters * args.batch_size * solver.param.iter_size
    return {"iterations": iters, "start_iter": start_iter, "seconds": seconds,
            "test_seconds": watcher.test_seconds, "images": images,
            "images_per_second": images / seconds if seconds else None,
            "stopped_by_budget": solver.iter < solver.param.max_iter}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import platform

    import torch

    from caffe_compat.engine.solver.base import Solver
    from caffe_compat.commands import device as devices
    from experiments.reproduce import scale_report, snapshot_check
    from experiments.reproduce.protocol import atomic_write_text, output_of, solver_summary_line
    from caffe_compat.formats import glog
    from caffe_compat.engine.solver.params import read_solver_param
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python tools/full_fashion_mnist.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    db = db_folder(args)
    from experiments.fashion_mnist import build_lmdbs
    build_seconds = build_lmdbs(Path(args.idx_dir), db, args.size, args.color, pad=args.pad)
    n_train, n_test = record_count(db / "train"), record_count(db / "test")
    file_max_iter = read_solver_param(args.solver).max_iter
    sp, net_path = solver_param(args, db, n_train, n_test)
    glog.set_stderr(False)
    log = glog.add_log_file(os.fspath(Path(args.work) / "train.log"))
    choice = devices.select(None, None, allow_cpu=True, precision=args.precision)
    solver = Solver(sp)
    if args.resume:
        solver.restore(args.resume)
    layout, layout_reason = use_layout(solver, args.layout, choice.precision)
    tops = (output_of(sp.net_param, "SoftmaxWithLoss", net_path),
            output_of(sp.net_param, "Accuracy", net_path))
    curve = Curve(Path(args.work) / "curve.json", solver.iter)
    epoch_iters = n_train / (args.batch_size * sp.iter_size)
    result = {"command": command.strip(), "threads": torch.get_num_threads(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "build_seconds": build_seconds, "schedule_iterations": file_max_iter,
              "n_train": n_train, "n_test": n_test, "precision": choice.precision,
              "precision_flag": args.precision, "layout": layout,
              "layout_reason": layout_reason}
    with devices.autocast(choice):
        result["train"] = train(solver, args, tops, curve, epoch_iters, command.strip())
        model, _ = solver.snapshot()
        final = test_once(solver, *tops)
    glog.remove_log_file(log)
    check = snapshot_check.verdict(snapshot_check.rescore(
        sp.net_param, net_path, model, sp.test_iter[0], tops[1], tops[0]), final["accuracy"],
        sp.test_iter[0] * args.test_batch)
    curve.tests = [t for t in curve.tests if t["iter"] != final["iter"]] + [final]
    curve.save()
    result["test"] = final | {"images": sp.test_iter[0] * args.test_batch}
    result["tests"] = curve.tests
    result["total_iterations"] = solver.iter
    result["segments"] = curve.segments
    result["model"] = Path(args.solver).parent.name
    result["net"] = os.path.relpath(net_path, REPO)     # the file embed_net read
    result["crop"] = train_crop(sp.net_param)
    losses = curve.train_loss
    result["train_loss_last50"] = float(np.nanmean(losses[-50:])) if losses else math.nan
    result["loss_curve"] = [float(np.nanmean(c)) for c in np.array_split(losses, 10) if len(c)]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.machine())
    result["machine"] = (f"{cpu}, {os.cpu_count()} cores, CPU only; torch {torch.__version__}, "
                         f"{'float32' if choice.precision == 'fp32' else 'bf16 autocast'} "
                         f"(--precision {args.precision}), {layout} layout, "
                         f"{torch.get_num_threads()} thread(s)")
    result["solver"] = solver_summary_line(sp)
    result["load"] = os.getloadavg()[0]
    result["snapshot_check"] = check
    report_path = Path(args.report)
    text = scale_report.markdown(result, args.batch_size, os.path.relpath(args.solver, REPO),
                                 size=args.size, pad=args.pad, color=args.color, target=TARGET,
                                 plot_name=report_path.with_suffix(".png").name)
    scale_report.plot(curve.train_loss, curve.tests, epoch_iters, TARGET,
                      report_path.with_suffix(".png"), model=result["model"])
    atomic_write_text(report_path, text)
    atomic_write_text(report_path.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    print(text)
    deploy = Path(net_path).parent / "deploy.prototxt"       # beside the train net
    try:      # the snapshot and report are written: a bad deploy must not fail the run
        written = deploy_for_records(deploy, 3 if args.color else 1,
                                     Path(args.work) / "deploy.prototxt")
        deploy_line = f"deploy: {written}"
    except (OSError, ValueError) as exc:     # a missing file, a parse error, no Input
        deploy_line = f"deploy: none written ({exc})"
    print(f"snapshot: {model}\n{deploy_line}\nwrote {report_path}, "
          f"{report_path.with_suffix('.json')} and {report_path.with_suffix('.png')}")
    if not check["agrees"]:
        print(f"error: {model} scores {check['accuracy'] * 100:.2f}% reloaded, the run measured "
              f"{final['accuracy'] * 100:.2f}%: the caffemodel does not hold the weights the "
              "run tested", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
