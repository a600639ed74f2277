"""``caffe time``: per-layer forward and backward timings of a net.

    tools/caffe.py time --model M.prototxt [--iterations 50] [--gpu 0] [--phase TRAIN]

As in Caffe, the net is built in the TRAIN phase by default and fed by its own data layers
(Input blobs hold zeros). After one untimed forward/backward ("Initial loss"), each
iteration runs the layers one at a time forward, then one at a time backward in reverse
order, timing each; Caffe's table follows, with every layer's average forward and backward
milliseconds (the layer type is shown beside its name), then the average forward, backward
and forward-backward times and the total.

The forward is the one executor's (engine/net/plan.py) with timing hooks, so each layer
runs as it does in training (loss layers in float32 under ``--precision bf16``). Each layer
runs on detached copies of its bottoms, so its backward is exactly its own
autograd work: the diffs of its tops (``loss_weight`` for loss tops, summed from the
consumers otherwise) go in, the bottoms' and params' diffs come out. Bottoms that need no
gradient (data, labels, anything with no learnable layer below) get none, as Caffe's
``bottom_need_backward``. CUDA work is synchronised around each timer.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

from caffe_compat.commands import device as devices
from caffe_compat._pycaffe.fast import inference_plan
from caffe_compat.commands.test_cmd import (add_net_arguments, engine_net, input_feed,
                                            load_net, net_forward)
from caffe_compat.engine.net.module import NetModule
from caffe_compat.engine.net.plan import Step, execute
from caffe_compat.formats import glog
from caffe_compat.formats.glog import num


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_net_arguments(ap, "TRAIN")
    ap.add_argument("--forward-only", "--forward_only", dest="forward_only",
                    action="store_true", help="time the forward passes only")


@dataclass
class LayerTime:
    name: str
    type: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0


@dataclass
class TimeResult:
    layers: list[LayerTime] = field(default_factory=list)
    forward_ms: float = 0.0            # averages per iteration
    backward_ms: float = 0.0
    forward_backward_ms: float = 0.0
    total_ms: float = 0.0
    initial_loss: float = 0.0


class _StepTimer:
    """Hooks for the executor (engine/net/plan.py) that time each step, as Caffe's timer
    around ``Net::ForwardFromTo``: every layer runs as in training (the executor's per-step
    rules included: float32 loss layers under bf16), on detached copies of its bottoms, and
    keeps its inputs and outputs for its own backward."""

    def __init__(self, module: NetModule, sync):
        self.m, self.sync = module, sync
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.forward_s = [0.0] * len(module.layers)
        self._t0 = 0.0

    def new_state(self) -> None:
        for p in self.params:
            p.grad = None
        self.saved: dict[int, tuple] = {}
        self.grads: dict[tuple[int, int], torch.Tensor] = {}
        self.producer: dict[str, tuple[int, int]] = {}
        self.forward_s = [0.0] * len(self.m.layers)

    def before(self, step: Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
        layer = self.m.layers[step.index]
        ins = []
        for j, src in enumerate(args):
            need = src.requires_grad and j not in layer.no_grad_bottoms and \
                src.is_floating_point()
            ins.append(src.detach().requires_grad_(need))
        self.sync()
        self._t0 = time.perf_counter()
        return ins

    def after(self, step: Step, args: list[torch.Tensor], outs) -> None:
        self.sync()
        self.forward_s[step.index] = time.perf_counter() - self._t0
        sources = [self.producer[b] for b in step.bottoms]
        self.saved[step.index] = (args, tuple(outs), sources)
        for k, t in enumerate(step.tops):
            self.producer[t] = (step.index, k)

    def forward(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every layer forward, one step at a time; returns the blobs."""
        self.new_state()
        with torch.enable_grad():
            return execute(self.m.plan(), {}, feed, hooks=self, source=self.m.source)

    def backward(self, i: int) -> float:
        """Layer ``i`` backward from its tops' accumulated diffs; returns seconds."""
        m = self.m
        ins, outs, sources = self.saved.pop(i)
        grads = self.grads
        tops, diffs = [], []
        for k, (t, out) in enumerate(zip(m.layer_tops(i), outs)):
            if not out.requires_grad:
                continue
            g = grads.pop((i, k), None)
            w = m.loss_weights.get(t, 0.0)
            if w:
                seed = torch.full_like(out, w)
                g = seed if g is None else g + seed
            if g is not None:
                tops.append(out)
                diffs.append(g)
        leaves = [x for x in ins if x is not None and x.requires_grad]
        self.sync()
        t0 = time.perf_counter()
        if tops:
            own = [p for p in m.layers[i].parameters() if p.requires_grad]
            torch.autograd.backward(tops, diffs, inputs=leaves + own if leaves + own else None)
        self.sync()
        elapsed = time.perf_counter() - t0
        for x, src in zip(ins, sources):
            if x is not None and x.grad is not None:
                grads[src] = x.grad if src not in grads else grads[src] + x.grad
        return elapsed


def benchmark(module: NetModule, iterations: int, choice: devices.DeviceChoice,
              forward_only: bool = False) -> TimeResult:
    """Caffe's time(): an untimed forward/backward, then ``iterations`` timed ones."""
    cuda = choice.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = _StepTimer(module, sync)
    feed = input_feed(module, choice.device)
    n = len(module.layers)
    result = TimeResult([LayerTime(name, layer.type)
                         for name, layer in module.named_layers()])
    with devices.autocast(choice):
        glog.info("Performing Forward", "caffe.cpp:363")
        blobs = timer.forward(feed)
        result.initial_loss = float(module.loss(blobs).detach())
        glog.info(f"Initial loss: {num(result.initial_loss)}", "caffe.cpp:368")
        if not forward_only:
            glog.info("Performing Backward", "caffe.cpp:369")
            for i in reversed(range(n)):
                timer.backward(i)
        glog.info("*** Benchmark begins ***", "caffe.cpp:377")
        glog.info(f"Testing for {iterations} iterations.", "caffe.cpp:378")
        forward = backward = 0.0
        start = time.perf_counter()
        for it in range(iterations):
            t_iter = time.perf_counter()
            timer.forward(feed)
            for i, dt in enumerate(timer.forward_s):
                result.layers[i].forward_ms += dt * 1e3
                forward += dt
            if not forward_only:
                for i in reversed(range(n)):
                    dt = timer.backward(i)
                    result.layers[i].backward_ms += dt * 1e3
                    backward += dt
            glog.info(f"Iteration: {it + 1} forward-backward time: "
                      f"{num((time.perf_counter() - t_iter) * 1e3)} ms.", "caffe.cpp:408")
        total = time.perf_counter() - start
    for lt in result.layers:
        lt.forward_ms /= iterations
        lt.backward_ms /= iterations
    result.forward_ms = forward * 1e3 / iterations
    result.backward_ms = backward * 1e3 / iterations
    result.forward_backward_ms = total * 1e3 / iterations
    result.total_ms = total * 1e3
    _log_table(result, forward_only)
    return result


def _log_table(result: TimeResult, forward_only: bool) -> None:
    glog.info("Average time per layer: ", "caffe.cpp:411")
    width = max([10] + [len(lt.name) for lt in result.layers])
    type_width = max(len(lt.type) for lt in result.layers) + 2 if result.layers else 0
    for lt in result.layers:
        label = f"{lt.name:>{width}} {'(' + lt.type + ')':<{type_width}}"
        glog.info(f"{label}\tforward: {num(lt.forward_ms)} ms.", "caffe.cpp:415")
        if not forward_only:
            glog.info(f"{label}\tbackward: {num(lt.backward_ms)} ms.", "caffe.cpp:418")
    glog.info(f"Average Forward pass: {num(result.forward_ms)} ms.", "caffe.cpp:423")
    if not forward_only:
        glog.info(f"Average Backward pass: {num(result.backward_ms)} ms.", "caffe.cpp:425")
        glog.info(f"Average Forward-Backward: {num(result.forward_backward_ms)} ms.",
                  "caffe.cpp:427")
    glog.info(f"Total Time: {num(result.total_ms)} ms.", "caffe.cpp:429")
    glog.info("*** Benchmark ends ***", "caffe.cpp:430")


def time_engine(module: NetModule, iterations: int, engine: str | None,
                precision: str = "fp32") -> float | None:
    """Whole-net forward timings through an inference engine, then the engine plan's steps
    timed one at a time (the exported prefix is one step; an SSD's DetectionOutput another);
    None where the net runs on torch layer by layer."""
    net = engine_net(module, engine, precision)
    if net is None:
        return None
    forward = net_forward(net, module)
    feed = input_feed(module, torch.device("cpu"))
    forward(**feed)                                    # first call: checked against torch
    glog.info("*** Benchmark begins ***", "caffe.cpp:377")
    glog.info(f"Testing for {iterations} iterations.", "caffe.cpp:378")
    start = time.perf_counter()
    for it in range(iterations):
        t_iter = time.perf_counter()
        forward(**feed)
        glog.info(f"Iteration: {it + 1} forward time: "
                  f"{num((time.perf_counter() - t_iter) * 1e3)} ms.", "caffe.cpp:408")
    total = (time.perf_counter() - start) * 1e3
    plan = inference_plan(net)
    if plan is not None:
        _log_engine_steps(module, plan, feed, iterations)
    glog.info(f"Average Forward pass: {num(total / iterations)} ms.", "caffe.cpp:423")
    glog.info(f"Total Time: {num(total)} ms.", "caffe.cpp:429")
    glog.info("*** Benchmark ends ***", "caffe.cpp:430")
    return total / iterations


class _EngineStepTimer:
    """Executor hooks timing each step of an engine plan."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self._t0 = 0.0

    def before(self, step: Step, args: list[torch.Tensor]) -> list[torch.Tensor]:
        self._t0 = time.perf_counter()
        return args

    def after(self, step: Step, args, outs) -> None:
        key = id(step)
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - self._t0


def _log_engine_steps(module: NetModule, plan, feed: dict, iterations: int) -> None:
    """Caffe's per-layer table for the engine plan, run by the executor with timing hooks."""
    timer = _EngineStepTimer()
    inputs = {n: feed[n].detach().cpu().float() for n in plan.inputs}
    with torch.no_grad():
        for _ in range(iterations):
            execute(plan.plan, dict(inputs), hooks=timer, source=module.source)
    glog.info("Average time per step of the engine plan: ", "caffe.cpp:411")
    for step in plan.plan:
        layer = module.layers[step.index]
        label = step.name if step.fn is plan.call else f"{step.name} ({layer.type})"
        ms = timer.seconds.get(id(step), 0.0) * 1e3 / iterations
        glog.info(f"{label:>24}\tforward: {num(ms)} ms.", "caffe.cpp:415")


def main(args: argparse.Namespace) -> int:
    module, choice = load_net(args)
    if time_engine(module, args.iterations, args.engine, args.precision) is None:
        benchmark(module, args.iterations, choice, args.forward_only)
    return 0


__all__ = ["add_arguments", "benchmark", "main", "TimeResult", "LayerTime", "time_engine"]
