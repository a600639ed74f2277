"""``caffe test``: score a trained net for ``--iterations`` batches.

    tools/caffe.py test --model M.prototxt --weights W.caffemodel [--iterations 50] [--gpu 0]

The net is built in the TEST phase (``--phase``, ``--level``, ``--stage`` change that) and fed
by its own data layers. Each batch logs ``Batch i, <output> = v`` for every element of every
output blob (blobs no layer consumes, alphabetically); then ``Loss: <mean weighted loss>`` and
each output's mean over the batches, with ``(* w = w·v loss)`` for loss outputs: Caffe's lines.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from caffe_compat.engine import weights as weights_io
from caffe_compat.commands import device as devices
from caffe_compat.commands.common import (CliError, add_debug_flag, add_engine_arguments,
                                          apply_threads)
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe import Net, read_net_prototxt
from caffe_compat.formats import glog
from caffe_compat.formats.glog import num

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


def add_net_arguments(ap: argparse.ArgumentParser, default_phase: str) -> None:
    """Flags shared by test and time: the model, its NetState, iterations and device."""
    ap.add_argument("--model", metavar="NET.prototxt", help="the net definition (required)")
    ap.add_argument("--iterations", type=int, default=50,
                    help="number of batches to run (default 50)")
    ap.add_argument("--phase", choices=list(PHASES), default=default_phase,
                    help=f"NetState phase to build the net in (default {default_phase})")
    ap.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    ap.add_argument("--stage", default="", help="comma-separated NetState stages")
    ap.add_argument("--gpu", metavar="ID", help="run on this CUDA device (default: CPU)")
    ap.add_argument("--allow-cpu", "--allow_cpu", dest="allow_cpu", action="store_true",
                    help="if --gpu is given but CUDA is unavailable, warn and use the CPU")
    ap.add_argument("--precision", choices=devices.PRECISION_CHOICES, default="fp32",
                    help="fp32 (default), bf16/fp16 autocast, or auto: for a TEST net fed by "
                         "Input layers bf16 only where it measures faster on the net and "
                         "within 3e-2 of fp32 on its outputs; otherwise the training probe")
    add_engine_arguments(ap)
    add_debug_flag(ap)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_net_arguments(ap, "TEST")
    ap.add_argument("--weights", metavar="W[,W2]",
                    help="the trained .caffemodel(s) to score (required; comma-separated "
                         "files are copied in order)")
    ap.add_argument("--allow-missing-weights", "--allow_missing_weights",
                    dest="allow_missing_weights", action="store_true",
                    help="score even when the weights leave layers with parameters at their "
                         "random initial values (default: an error naming them)")


def load_net(args: argparse.Namespace, weights: str | None = None) -> tuple[NetModule,
                                                                          devices.DeviceChoice]:
    """Select the device, build ``--model`` for (phase, level, stages), copy ``weights``."""
    if not args.model:
        raise CliError("Need a model definition: pass --model NET.prototxt")
    if args.iterations <= 0:
        raise CliError(f"--iterations must be > 0 (got {args.iterations})")
    inference_auto = args.precision == devices.AUTO and args.phase == "TEST"
    choice = devices.select(args.gpu, None, args.allow_cpu,
                            "fp32" if inference_auto else args.precision)
    if len(choice.ids) > 1:
        raise CliError(f"--gpu {args.gpu}: give one device for this command")
    devices.apply(choice)
    apply_threads(args)
    param = read_net_prototxt(args.model)
    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    module = build_net(param, PHASES[args.phase], args.level, stages, source=args.model)
    module = module.to(choice.device)
    paths = [p.strip() for p in (weights or "").split(",") if p.strip()]
    for path in paths:
        glog.info(f"Copying trained layers from {path}", "net.cpp:780")
    if paths:
        weights_io.copy_all(module, paths,
                            require_all=not getattr(args, "allow_missing_weights", True))
    return module, choice


def input_feed(module: NetModule, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeros for every Input blob (``caffe test/time`` run whatever the blobs hold)."""
    feed = {}
    for name in module.input_names:
        shape = module.blob_shapes.get(name)
        if not shape:
            raise CliError(f"{module.source}: Input blob '{name}' has no shape; give "
                           "input_param { shape { dim: ... } }")
        feed[name] = torch.zeros(shape, device=device)
    return feed


def engine_net(module: NetModule, engine: str | None, precision: str = "fp32") -> Net | None:
    """The pycaffe Net whose ``forward`` runs ``module`` through the inference engine
    ``engine`` names, or None where the net runs its own forward (torch asked for or chosen,
    or a net the engines do not serve: data layers, Python layers, the TRAIN phase).
    ``precision`` "auto": bf16 competes too (engine/backends/engine.py)."""
    from caffe_compat.engine.backends.engine import requested_engine
    precision = "auto" if precision == devices.AUTO and module.phase == caffe_pb2.TEST \
        else "fp32"
    if requested_engine(engine) == "torch" and precision == "fp32":
        return None
    net = Net.from_module(module)
    net._choose_engine(engine, precision)
    if net.engine == "torch":
        return None
    glog.info(f"Inference engine: {net.engine}", "caffe.cpp:290")
    return net


def net_forward(net: Net, module: NetModule):
    """``feed -> (loss, outputs)`` through ``net.forward``."""
    def forward(**feed):
        out = net.forward(**{n: t.detach().cpu().float().numpy() for n, t in feed.items()})
        outputs = {n: torch.from_numpy(v.copy()) for n, v in out.items()}
        loss = sum(w * float(outputs[n].double().sum())
                   for n, w in module.loss_weights.items() if n in outputs)
        return torch.tensor(float(loss)), outputs
    return forward


def engine_forward(module: NetModule, engine: str | None, precision: str = "fp32"):
    """``feed -> (loss, outputs)`` through ``engine_net``, or None where that is None."""
    net = engine_net(module, engine, precision)
    return None if net is None else net_forward(net, module)


@dataclass
class TestResult:
    names: list[str]        # one per output element, Caffe's order
    means: list[float]
    loss: float


def score(module: NetModule, iterations: int, choice: devices.DeviceChoice,
          engine: str | None = None, precision: str = "fp32") -> TestResult:
    """Caffe's test(): per-batch lines, then the mean loss and mean of each output element."""
    forward = engine_forward(module, engine, precision) or module.forward_loss
    glog.info(f"Running for {iterations} iterations.", "caffe.cpp:290")
    feed = input_feed(module, choice.device)
    sums: list[float] = []
    names: list[str] = []
    loss_sum = 0.0
    with torch.no_grad(), devices.autocast(choice):
        for i in range(iterations):
            loss, outputs = forward(**feed)
            loss_sum += float(loss)
            idx = 0
            for name in module.output_names:
                for value in outputs[name].detach().float().reshape(-1).tolist():
                    if i == 0:
                        sums.append(value)
                        names.append(name)
                    else:
                        sums[idx] += value
                    idx += 1
                    glog.info(f"Batch {i}, {name} = {num(value)}", "caffe.cpp:313")
    mean_loss = loss_sum / iterations
    glog.info(f"Loss: {num(mean_loss)}", "caffe.cpp:318")
    means = [s / iterations for s in sums]
    for name, mean in zip(names, means):
        w = module.loss_weights.get(name, 0.0)
        suffix = f" (* {num(w)} = {num(w * mean)} loss)" if w else ""
        glog.info(f"{name} = {num(mean)}{suffix}", "caffe.cpp:330")
    return TestResult(names, means, mean_loss)


def main(args: argparse.Namespace) -> int:
    if not args.weights:
        raise CliError("Need model weights to score: pass --weights W.caffemodel")
    module, choice = load_net(args, args.weights)
    score(module, args.iterations, choice, args.engine, args.precision)
    return 0


__all__ = ["add_arguments", "add_net_arguments", "load_net", "input_feed", "score", "main",
           "TestResult", "engine_forward", "engine_net", "net_forward"]
