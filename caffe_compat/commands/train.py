"""``caffe train``: train from a solver prototxt, with Caffe's flags.

    caffe train --solver S [--weights W[,W2]] [--snapshot S.solverstate|auto] [--gpu 0|0,1|all]
                [--iterations N] [--precision fp32|bf16|fp16|auto]
                [--layout nchw|nhwc|auto] [--allocator system|reuse] [--compile] [--allow-cpu]
                [--sigint_effect stop|snapshot|none] [--sighup_effect stop|snapshot|none]
                [--tensorboard DIR] [--cpu-procs N]

Paths inside the solver (``net``, ``snapshot_prefix``) and the nets (data ``source``) are read
relative to the working directory, as Caffe does (a ``net`` path is also looked up beside the
solver file). Files written, all next to the snapshots:

- ``<snapshot_prefix>_iter_N.caffemodel`` / ``.solverstate`` (Caffe's names and formats);
- ``<snapshot_prefix>.log``: the glog lines (also on stderr), in Caffe's format so Caffe's
  ``parse_log.py`` / ``parse_log.sh`` and ``tools/parse_log.py`` read it; appended to, so a
  resumed run continues the log of the run it resumes and nothing is ever truncated (an
  unrelated run over the same prefix starts a new run in it, which parse_log/plot_log keep
  apart);
- ``<snapshot_prefix>.metrics.jsonl``: one JSON line per iteration and per test, each run
  opened by a ``"kind": "run"`` line;
- ``<snapshot_prefix>.lock`` while the run lasts: a second run over the same prefix is
  refused, naming the first (a lock left by a killed run is taken over, with a warning);
- ``<snapshot_prefix>.png``: the training curves, redrawn at every test.

The folder of ``snapshot_prefix`` is created if missing (Caffe would refuse to start).
``--snapshot`` restores the iteration, weights and history, and data layers continue at the
batch an uninterrupted run would read next, so a resumed run is bit-identical to one that was
never stopped. ``--gpu 0,1`` / ``all`` and ``--cpu-procs N`` train data-parallel over
torch.distributed (``caffe_compat.engine.distributed``); under ``torchrun`` each process joins
the group from the environment. The command drives the solver engine's one training loop and
observes it through its events (progress bar, metrics, plot, TensorBoard).
At the end it prints the last snapshot, the final test outputs, the log and the plot.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from dataclasses import dataclass, field, replace

import torch

from caffe_compat.engine import distributed
from caffe_compat.commands import device as devices
from caffe_compat.commands.common import CliError, add_debug_flag, one_line
from caffe_compat.commands.observers import (LastTests, LivePlot, MetricsFile, SnapshotRecord,
                                             TensorBoard)
from caffe_compat.commands.train_checks import clean_snapshot_folder, prepare_train_args
from caffe_compat.commands.progress import TrainProgress
from caffe_compat.commands.signals import EFFECTS, SignalHandler
from caffe_compat.formats import glog
from caffe_compat.formats.prefix_lock import PrefixLock
from caffe_compat.engine.acceleration import compile_for_training
from caffe_compat.engine.allocator import ALLOCATORS, use_allocator
from caffe_compat.engine.layout import AUTO as AUTO_LAYOUT, LAYOUT_CHOICES, apply_layout, \
    decide_layout
from caffe_compat.engine.solver.base import NonFiniteLossError, Solver
from caffe_compat.engine.solver.params import read_solver_param


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--solver", metavar="SOLVER.prototxt",
                    help="the solver definition (required)")
    ap.add_argument("--weights", metavar="W[,W2]",
                    help="fine-tune: copy these .caffemodel (or .caffemodel.h5) files' layers "
                         "into the nets by layer name before training; comma-separated. "
                         "Not with --snapshot")
    ap.add_argument("--snapshot", metavar="S.solverstate",
                    help="resume training from this .solverstate (or .solverstate.h5): "
                         "iteration, solver history and the weights it names; 'auto': the "
                         "newest complete snapshot under snapshot_prefix (none: start fresh)")
    ap.add_argument("--gpu", metavar="0|0,1|all",
                    help="train on these CUDA devices (default: CPU, unless the solver sets "
                         "solver_mode: GPU)")
    ap.add_argument("--iterations", type=int, metavar="N",
                    help="train up to iteration N (overrides the solver's max_iter)")
    ap.add_argument("--level", type=int, default=0,
                    help="the train net's NetState level (default 0)")
    ap.add_argument("--stage", default="",
                    help="comma-separated NetState stages of the train net")
    ap.add_argument("--precision", choices=devices.PRECISION_CHOICES, default="fp32",
                    help="fp32 (default; what Caffe computes), bf16/fp16 autocast, or auto "
                         "(bf16/fp16 only where a probe shows it faster on this machine)")
    ap.add_argument("--layout", choices=LAYOUT_CHOICES, default="nchw",
                    help="memory layout of the convolutions: nchw (default, Caffe's), nhwc "
                         "(channels-last strides; blobs keep their NCHW shapes), or auto "
                         "(nhwc where a probe at the run's precision shows it faster)")
    ap.add_argument("--allocator", choices=ALLOCATORS, default="system",
                    help="system (default): malloc as it is; reuse: keep freed memory mapped "
                         "so each step reuses the last one's pages (fewer page faults, faster "
                         "where they are costly, e.g. VMs; higher peak memory). glibc only")
    ap.add_argument("--allow-cpu", "--allow_cpu", dest="allow_cpu", action="store_true",
                    help="if a GPU is asked for but CUDA is unavailable, warn and use the CPU "
                         "instead of failing")
    ap.add_argument("--sigint_effect", choices=EFFECTS, default="stop",
                    help="what Ctrl-C (SIGINT) does: stop (after a snapshot; default), "
                         "snapshot and go on, or none")
    ap.add_argument("--sighup_effect", choices=EFFECTS, default="snapshot",
                    help="what SIGHUP does: snapshot and go on (default), stop, or none")
    ap.add_argument("--log", metavar="FILE",
                    help="write the log here instead of <snapshot_prefix>.log")
    ap.add_argument("--no-plot", "--no_plot", dest="plot", action="store_false",
                    help="do not draw <snapshot_prefix>.png (redrawn at every test)")
    ap.add_argument("--plot-path", "--plot_path", dest="plot_path", metavar="FILE.png",
                    help="draw the curves here (default <log name>.png)")
    ap.add_argument("--metrics", metavar="FILE",
                    help="JSON lines per iteration and test (default <log name>.metrics.jsonl)")
    ap.add_argument("--tensorboard", metavar="DIR",
                    help="also write TensorBoard scalars (every train/test output, lr, "
                         "images/s) and weight histograms at each snapshot into DIR")
    ap.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                    help="the tqdm progress bar: on a terminal only (auto, default), always, "
                         "or never")
    ap.add_argument("--cpu-procs", "--cpu_procs", dest="cpu_procs", type=int, default=1,
                    metavar="N", help="data-parallel training over N CPU processes (gloo); the "
                                      "same code path as --gpu 0,1, for machines without GPUs")
    # -- performance hooks (issue 13; logic in caffe_compat/engine/acceleration.py) --------
    ap.add_argument("--compile", action="store_true",
                    help="run the train net through torch.compile (falls back to eager PyTorch "
                         "with a warning if compilation fails)")
    add_debug_flag(ap)


@dataclass
class TrainResult:
    """What a training run produced (for callers and tests)."""
    solver: Solver
    log_path: str
    plot_path: str | None = None
    snapshots: list[tuple[str, str]] = field(default_factory=list)   # (model, solverstate)
    stopped_early: bool = False
    tests: object = None          # the last test event of each test net


def log_path_for(prefix: str) -> str:
    """``<prefix>.log``; a prefix naming a folder (``snap/``) gives ``snap/train.log``."""
    return prefix + ("train.log" if prefix.endswith(("/", os.sep)) else ".log")


def _check_args(args: argparse.Namespace) -> None:
    if not args.solver:
        raise CliError("Need a solver definition to train: pass --solver SOLVER.prototxt")
    if args.snapshot and args.weights:
        raise CliError("Give a snapshot to resume training or weights to finetune but not "
                       "both (--snapshot and --weights)")
    if args.iterations is not None and args.iterations < 0:
        raise CliError(f"--iterations must be >= 0 (got {args.iterations})")
    for path in [args.snapshot] + (args.weights or "").split(","):
        if path and not os.path.isfile(path):
            flag = "--snapshot" if path == args.snapshot else "--weights"
            raise CliError(f"{flag} {path}: no such file")


def _solver_param(args: argparse.Namespace):
    """Read the solver file and apply the command line (Caffe's order in caffe.cpp train())."""
    param = read_solver_param(args.solver)
    param.train_state.level = args.level
    for stage in filter(None, (s.strip() for s in args.stage.split(","))):
        param.train_state.stage.append(stage)
    if args.iterations is not None:
        param.max_iter = args.iterations
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    return param


def _use_layout(layout: str, solver: Solver, precision: str) -> None:
    """Store the nets' convolution weights in ``--layout`` (test nets share them)."""
    if layout == AUTO_LAYOUT:
        decision = distributed.decided_by_root(lambda: decide_layout(solver.device, precision))
        glog.info(f"--layout auto: {decision.reason}", "caffe.cpp:215")
        layout = decision.layout
    if layout != "nchw":
        count = apply_layout(solver.train_module, layout)
        glog.info(f"Layout {layout}: {count} weight blobs stored channels-last (blob shapes "
                  "stay NCHW)", "caffe.cpp:216")


def _open_log(path: str):
    """Append glog's header, then every line of the run, to ``path`` (never truncated)."""
    return glog.add_log_file(path, header=True)


def train(args: argparse.Namespace, out=None) -> TrainResult:
    """Run ``caffe train`` for parsed ``args``; errors propagate (``common.run`` prints them)."""
    args = prepare_train_args(args)     # issue 12 hook: --cpu-procs check, --snapshot auto
    _check_args(args)
    param = _solver_param(args)
    joined = distributed.init_from_env()       # started by torchrun: one process per device
    choice = devices.select(args.gpu, param, args.allow_cpu, args.precision)
    if joined:
        if choice.kind == "cuda":
            choice = replace(choice, ids=[torch.cuda.current_device()])
        return _train_member(args, param, choice, out)
    workers = choice.ids if len(choice.ids) > 1 else [None] * args.cpu_procs
    if len(workers) > 1:
        distributed.launch(functools.partial(_parallel_worker, args=args, choice=choice), workers)
        return None
    return _train_member(args, param, choice, out)


def _parallel_worker(rank: int, args: argparse.Namespace, choice) -> None:
    """One process of a data-parallel run (spawned by ``distributed.launch``)."""
    if choice.kind == "cuda":
        choice = replace(choice, ids=[choice.ids[rank]])
    _train_member(args, _solver_param(args), choice, None)   # protobufs do not pickle


def _train_member(args, param, choice, out) -> TrainResult | None:
    """Train in this process; in a data-parallel group only the root logs and reports."""
    if not distributed.is_root():
        glog.set_stderr(False)
        args = copy.copy(args)
        args.plot, args.progress = False, "never"
        _train(args, param, choice, None, out)
        return None
    prefix_dir = os.path.dirname(param.snapshot_prefix)
    if prefix_dir:
        os.makedirs(prefix_dir, exist_ok=True)
    notes: list[str] = []        # said once the log is open
    with PrefixLock(param.snapshot_prefix, warn=notes.append):   # a second run is refused
        return _train_root(args, param, choice, out, notes)


def _train_root(args, param, choice, out, notes: list[str]) -> TrainResult:
    """The root process's run, holding the prefix: log, clean-up, train, report."""
    log_path = args.log or log_path_for(param.snapshot_prefix)
    earlier_run = os.path.isfile(log_path) and os.path.getsize(log_path) > 0
    log_file = _open_log(log_path)
    for note in notes:
        glog.warning(note, "caffe.cpp:202")
    if earlier_run and not args.snapshot:
        glog.info(f"{log_path} holds an earlier run: a new run starts here (it resumes no "
                  "snapshot); parse_log and plot_log keep the runs apart", "caffe.cpp:203")
    clean_snapshot_folder(param.snapshot_prefix)   # temporaries of killed writers
    if distributed.world_size() > 1:
        glog.info(f"Data-parallel training over {distributed.world_size()} processes: each "
                  f"runs batch_size per iteration with {torch.get_num_threads()} CPU thread(s) "
                  "and the gradients are averaged", "caffe.cpp:204")
    try:
        return _train(args, param, choice, log_path, out)
    except Exception as exc:
        if not isinstance(exc, NonFiniteLossError):     # the solver has logged that one
            log_file.stream.write(glog.format_line(one_line(exc), "caffe.cpp:250", "E"))
            log_file.flush()
        raise
    finally:
        glog.remove_log_file(log_file)


def _train(args, param, choice, log_path: str, out) -> TrainResult:
    allocator = use_allocator(getattr(args, "allocator", "system"))   # before any tensor
    if allocator.name != "system":
        (glog.info if allocator.applied else glog.warning)(allocator.line, "caffe.cpp:212")
    devices.apply(choice)
    if choice.ids:
        param.device_id = choice.ids[0]
    solver = Solver(param, source=args.solver)
    _use_layout(getattr(args, "layout", "nchw"), solver, choice.precision)
    if getattr(args, "compile", False):          # performance hook (issue 13)
        compile_for_training(solver.train_module, warn=lambda m: glog.warning(m, "caffe.cpp:231"))
    result = TrainResult(solver, log_path)
    if solver.train_module.input_names:
        glog.warning(f"the train net has Input blobs ({', '.join(solver.train_module.input_names)}"
                     ") and nothing feeds them from the command line: they stay 0. Use data "
                     "layers, or train from Python (solver.net.blobs[...])", "caffe.cpp:220")
    if args.snapshot:
        glog.info(f"Resuming from {args.snapshot}", "caffe.cpp:226")
        solver.restore(args.snapshot)
    glog.info("Starting Optimization", "caffe.cpp:232")
    show = {"auto": None, "always": True, "never": False}[args.progress]
    observers = _observers(args, solver, log_path)
    try:
        with SignalHandler(args.sigint_effect, args.sighup_effect) as signals, \
                TrainProgress(param.max_iter, enabled=show).attach(solver), \
                devices.autocast(choice):
            solver.add_action_source(signals.action)
            solver.solve()
    finally:
        for observer in observers.values():
            observer.close()
        solver.close()
    result.snapshots = observers["snapshots"].snapshots
    result.stopped_early = solver.requested_early_exit
    result.tests = observers["tests"]
    glog.info("Optimization Done.", "caffe.cpp:243")
    if log_path is None:             # a non-root member of a data-parallel group
        return result
    plot = observers.get("plot")
    if plot is not None:
        result.plot_path = plot.drawn or plot.draw()
    _summary(result, out)
    return result


def _observers(args, solver: Solver, log_path: str | None) -> dict:
    """What watches this run: snapshots and tests always; metrics, plot, TensorBoard on the
    root process only."""
    found = {"snapshots": SnapshotRecord().attach(solver), "tests": LastTests().attach(solver)}
    if log_path is None:
        return found
    stem = os.path.splitext(log_path)[0]
    found["metrics"] = MetricsFile(args.metrics or stem + ".metrics.jsonl",
                                   resumed=bool(args.snapshot),
                                   start_iter=solver.iter).attach(solver)
    if args.plot:
        found["plot"] = LivePlot(getattr(args, "plot_path", None) or stem + ".png",
                                 os.path.basename(log_path)).attach(solver)
    if args.tensorboard:
        found["tensorboard"] = TensorBoard(args.tensorboard).attach(solver)
    return found


def _summary(result: TrainResult, out) -> None:
    solver = result.solver
    lines = []
    if result.stopped_early:
        lines.append(f"Stopped early at iteration {solver.iter} (signal).")
    if result.snapshots:
        model, state = result.snapshots[-1]
        lines += [f"Snapshot:     {model}", f"Solver state: {state}"]
    else:
        lines.append("Snapshot:     none written (snapshot: 0 and snapshot_after_train: false)")
    tests = result.tests.last if result.tests is not None else {}
    for net, event in sorted(tests.items()):
        outputs = ", ".join(f"{name} = {v:g}" for name, values in event.scores.items()
                            for v in values)
        lines.append(f"Test net #{net} (iteration {event.iter}): {outputs or 'no outputs'}")
    if not tests:
        lines.append("Test:         no test net ran" if solver.test_modules else
                     "Test:         the solver has no test nets")
    lines.append(f"Log:          {result.log_path}")
    if result.plot_path:
        lines.append(f"Plot:         {result.plot_path}")
    print("\n".join(lines), file=out or sys.stdout, flush=True)


def main(args: argparse.Namespace) -> int:
    train(args)
    return 0


__all__ = ["add_arguments", "train", "main", "TrainResult", "log_path_for"]
