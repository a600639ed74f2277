"""Training steps (forward + backward, what ``caffe time`` measures) of the prototxt-built net
and, where one exists, the hand-written PyTorch net, in each precision and memory layout.

One model per implementation; a layout switch converts its weights between rounds (untimed).
FLOPs per step = 6 x MACs per image x batch (forward 2 x MACs, backward twice the forward);
the fraction of the CPU's fp32 peak is GFLOP/s / machine.peak_fp32_gflops.
"""
from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from caffe_compat.engine.acceleration import to_channels_last, to_contiguous
from caffe_compat.engine.analysis import total_macs
from caffe_compat.engine.layers.base import TRAIN
from caffe_compat.engine.net.module import build_net
from caffe_compat.proto import caffe_pb2

from .hand import HAND
from .inference import deploy_param
from .timing import alternate

NATIVE = 224


def train_param(prototxt: Path, batch: int, size: int) -> caffe_pb2.NetParameter:
    """The deploy net as a training net: a label Input, SoftmaxWithLoss instead of "prob".

    Away from 224 x 224 a fixed 7 x 7 average pool (ResNet, GoogLeNet) becomes global."""
    param = deploy_param(prototxt, batch, size)
    prob = [lp for lp in param.layer if lp.name == "prob"][0]
    scores = prob.bottom[0]
    param.layer.remove(prob)
    for lp in param.layer:
        pp = lp.pooling_param
        if lp.type == "Pooling" and size != NATIVE and pp.pool == pp.AVE and \
                pp.kernel_size == 7:
            pp.ClearField("kernel_size")
            pp.global_pooling = True
    label = param.layer.add(name="label", type="Input", top=["label"])
    label.input_param.shape.add().dim.append(batch)
    param.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[scores, "label"], top=["loss"])
    return param


def _models(net: str, prototxt: Path, batch: int, size: int, impls) -> dict:
    torch.manual_seed(0)
    models = {}
    if "prototxt" in impls:
        built = build_net(train_param(prototxt, batch, size), TRAIN, source=str(prototxt))
        models["prototxt"] = (built, lambda x, y, m=built: m.forward_loss(data=x, label=y)[0])
    if "hand" in impls and net in HAND:
        hand = HAND[net](size)
        models["hand"] = (hand, lambda x, y, m=hand: m(x, y))
    return models


def _step(loss_of, module, x, y, dtype):
    cast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()

    def step():
        module.zero_grad(set_to_none=True)
        with cast:
            loss = loss_of(x, y)
        loss.float().backward()
    return step


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def bench_training(net: str, prototxt: Path, batch: int, size: int, iters: int, rounds: int,
                   precisions, layouts, impls, peak_gflops: float | None) -> dict:
    models = _models(net, prototxt, batch, size, impls)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen).float()
    macs = total_macs(models["prototxt"][0]) if "prototxt" in models else None
    cands, prepare = {}, {}
    for impl, (module, loss_of) in models.items():
        for layout in layouts:
            xin = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
            convert = to_channels_last if layout == "nhwc" else to_contiguous
            for precision in precisions:
                key = f"{impl}/{layout}/{precision}"
                cands[key] = _step(loss_of, module, xin, y, PRECISIONS[precision])
                prepare[key] = lambda convert=convert, module=module: convert(module)
    times = alternate(cands, iters, rounds, prepare=prepare)
    flops = 6 * macs * batch if macs else None
    rows = {}
    for key, t in times.items():
        gflops = flops / (t["ms"] / 1000) / 1e9 if flops else None
        rows[key] = {**t, "gflops": gflops,
                     "fraction_of_peak": gflops / peak_gflops if gflops and peak_gflops else None}
    return {"net": net, "batch": batch, "size": size, "flops_per_step": flops,
            "configs": rows}


def memory_child(spec: dict) -> None:
    """Run in a fresh process: two steps of one config, then print the process's peak RSS.
    (run.py has applied ``spec["allocator"]`` to this process before calling.)"""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    models = _models(spec["net"], Path(spec["prototxt"]), spec["batch"], spec["size"],
                     [spec["impl"]])
    module, loss_of = models[spec["impl"]]
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
    y = torch.zeros(spec["batch"])
    step = _step(loss_of, module, x, y, None)
    for _ in range(2):
        step()
    print(json.dumps({"peak_rss_bytes": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident memory. VmHWM is per address space, so it starts afresh
    at exec; getrusage's ru_maxrss would carry the parent's peak from before the fork."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(run_py: Path, spec: dict, timeout: int = 1200) -> int | None:
    """Peak resident memory (bytes) of a process running ``spec`` (see ``memory_child``)."""
    proc = subprocess.run([sys.executable, str(run_py), "--memory-child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return int(json.loads(line)["peak_rss_bytes"])
    return None
