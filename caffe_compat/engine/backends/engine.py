"""Inference engines for a TEST net, chosen by name or by measurement.

``engine="torch"`` is the fused plan (engine/net/fuse.py). ``"onnxruntime"`` and
``"openvino"`` run the net's exportable prefix (split.py) in that runtime and the rest (an
SSD's DetectionOutput, R-CNN's ROIPooling) in torch on its outputs. ``"auto"`` builds every
engine whose package is installed, checks its outputs against torch's on random inputs of the
net's own shape, times them alternately (best of ``ROUNDS`` to 100 single calls each, about
half a second in all) and keeps the fastest.

Outputs must equal the torch path's within ``TOLERANCE``: max |engine - torch| over an output,
divided by max(1, max |torch output|); for a split net, over the blobs the engine computes
(the inputs of its DetectionOutput, say: see ``ExportedForward.difference``). That is
checked at load on random inputs and again on the first real call
(``EngineChoice.verified``); a difference there, a failed export or a missing package leaves
the net on torch with a log line saying why. ``precision="auto"``
also considers the torch path under bf16 autocast on CPUs with native bf16 (AMX,
AVX512-BF16), within ``BF16_TOLERANCE`` of fp32 and only where it measures fastest; fp32
stays the default.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from caffe_compat.engine.backends import ENGINES
from caffe_compat.engine.backends.onnx_export import export_onnx
from caffe_compat.engine.backends.runners import RUNNERS, BackendUnavailable
from caffe_compat.engine.backends.split import Split, run_suffix, split_plan
from caffe_compat.engine.net.module import NetModule
from caffe_compat.engine.precision import best_times

log = logging.getLogger(__name__)

ENGINE_ENV = "CAFFE_COMPAT_ENGINE"
TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2     # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, summed over layers
ROUNDS = 7

Outputs = dict[str, torch.Tensor]


def requested_engine(engine: str | None) -> str:
    """``engine``, else $CAFFE_COMPAT_ENGINE, else "torch"; unknown names are an error."""
    name = (engine or os.environ.get(ENGINE_ENV) or "torch").strip().lower()
    if name not in ENGINES:
        raise ValueError(f"engine {name!r}: expected one of {', '.join(ENGINES)}")
    return name


class ExportedForward:
    """The exported prefix in one runtime, then the suffix in torch."""

    def __init__(self, split: Split, runner, name: str, shapes: dict[str, tuple]):
        self.split, self.runner, self.name = split, runner, name
        self.shapes = {n: torch.Size(shapes[n]) for n in split.prefix_inputs}

    def accepts(self, inputs: Outputs) -> bool:
        """The export has fixed shapes: a reshaped input blob goes to torch."""
        return all(inputs[n].shape == s for n, s in self.shapes.items())

    def __call__(self, inputs: Outputs) -> Outputs:
        feed = {n: np.ascontiguousarray(inputs[n].numpy()) for n in self.split.prefix_inputs}
        values = self.runner(feed)
        made = {n: torch.from_numpy(np.asarray(v))
                for n, v in zip(self.split.prefix_outputs, values)}
        self.last = (inputs, made)
        blobs = {**inputs, **made}
        if self.split.suffix:
            with torch.no_grad():
                run_suffix(self.split.suffix, blobs)
        return {n: blobs[n] for n in self.split.output_names}

    def difference(self, outputs: Outputs, reference: Outputs) -> float:
        """How far the last call's exported part is from torch computing the same blobs.

        The exported part is what this engine computes; the suffix runs torch's own layers
        on it. Comparing there, not at the net's outputs, keeps a DetectionOutput's
        thresholds (a score at 0.3000001 against 0.2999999 keeps one more box) from
        turning a 1e-7 difference into a different detection list."""
        if not self.split.suffix:
            return difference(outputs, reference)
        inputs, made = self.last
        with torch.no_grad():
            want = self.split.prefix(*(inputs[n] for n in self.split.prefix_inputs))
        return difference(made, dict(zip(self.split.prefix_outputs, want)))


def difference(got: Outputs, want: Outputs) -> float:
    """Largest relative difference over the outputs (inf where a shape differs)."""
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        if tuple(g.shape) != tuple(w.shape):
            return float("inf")
        if w.numel():
            scale = max(1.0, float(w.abs().max()))
            worst = max(worst, float((g.float() - w.float()).abs().max()) / scale)
    return worst


def random_inputs(module: NetModule, seed: int = 0) -> Outputs:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(*module.blob_shapes[n], generator=gen) for n in module.input_names}


def build_exported(module: NetModule, names: list[str], threads: int,
                   workdir: str) -> tuple[dict[str, ExportedForward], dict[str, str]]:
    """The exported engines among ``names`` that load, and why the others did not."""
    built, why = {}, {}
    split = split_plan(module)
    if split.prefix is None:
        return built, {n: "no layer at the start of the net can be exported" for n in names}
    path = os.path.join(workdir, "prefix.onnx")
    example = [torch.rand(*module.blob_shapes[n]) for n in split.prefix_inputs]
    try:
        _export(split, example, path)
    except Exception as exc:   # noqa: BLE001 - exporter errors come in many types
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return built, {n: f"the ONNX export failed ({text})" for n in names}
    for name in names:
        try:
            built[name] = ExportedForward(split, RUNNERS[name](
                path, split.prefix_inputs, split.prefix_outputs, threads), name,
                module.blob_shapes)
        except BackendUnavailable as exc:
            why[name] = str(exc)
        except Exception as exc:   # noqa: BLE001 - a runtime that cannot load the graph
            why[name] = f"{name} could not load the export ({str(exc).splitlines()[0][:200]})"
    return built, why


def _export(split: Split, example: list[torch.Tensor], path: str) -> None:
    """The quick TorchScript-traced export, the dynamo exporter where tracing fails."""
    try:
        export_onnx(split.prefix, example, path, split.prefix_inputs, split.prefix_outputs,
                    dynamo=False)
    except Exception:   # noqa: BLE001 - then the slower exporter decides
        export_onnx(split.prefix, example, path, split.prefix_inputs, split.prefix_outputs)


@dataclass
class EngineChoice:
    name: str                                   # the engine in use
    forward: Callable[[Outputs], Outputs] | None  # None: the torch path
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)
    verified: bool = False                      # outputs checked on a real call
    tolerance: float = TOLERANCE


class ReducedForward:
    """The torch path under bf16 autocast (``precision="auto"`` on AMX / AVX512-BF16),
    outputs back in float32."""

    name = "torch-bf16"

    def __init__(self, torch_forward: Callable[[Outputs], Outputs]):
        self.torch_forward = torch_forward

    def accepts(self, inputs: Outputs) -> bool:
        return True

    def difference(self, outputs: Outputs, reference: Outputs) -> float:
        return difference(outputs, reference)

    def __call__(self, inputs: Outputs) -> Outputs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.torch_forward(inputs)
        return {k: v.float() for k, v in out.items()}


def _candidates(module, request, precision, torch_forward, threads):
    """({name: forward}, {name: tolerance}, {name: why not}) of the engines to consider."""
    names = [] if request == "torch" else list(RUNNERS) if request == "auto" else [request]
    built, why = {}, {}
    if names:
        with tempfile.TemporaryDirectory(prefix="caffe-compat-engine-") as workdir:
            built, why = build_exported(module, names, threads, workdir)
    tolerance = {name: TOLERANCE for name in built}
    if precision == "auto":
        from caffe_compat.engine.precision import candidates
        if "bf16" in candidates(torch.device("cpu")):
            built[ReducedForward.name] = ReducedForward(torch_forward)
            tolerance[ReducedForward.name] = BF16_TOLERANCE
        else:
            why[ReducedForward.name] = "this CPU has no native bf16 (AMX, AVX512-BF16)"
    return built, tolerance, why


def _rounds(steps: dict[str, Callable[[], object]], budget_s: float = 0.5) -> int:
    """Alternating rounds for the timing: ``ROUNDS`` at least, more for nets of a
    millisecond or less (the best of 7 single 0.1 ms calls on a busy machine picked the
    slower runtime), so that the timing takes about ``budget_s``; 100 at most."""
    slowest = 0.0
    for step in steps.values():
        t0 = time.perf_counter()
        step()
        slowest = max(slowest, time.perf_counter() - t0)
    per_round = slowest * len(steps)
    return int(min(100, max(ROUNDS, budget_s / per_round if per_round else 100)))


def choose_engine(module: NetModule, request: str, torch_forward: Callable[[Outputs], Outputs],
                  threads: int | None = None, precision: str = "fp32") -> EngineChoice:
    """The engine for ``module`` (see the module docstring); ``torch_forward`` is the torch
    path (inputs -> outputs). ``precision="auto"`` adds the torch path under bf16 autocast
    where the CPU has native bf16, kept only if faster and within ``BF16_TOLERANCE``."""
    request = requested_engine(request)
    if request == "torch" and precision != "auto":
        return EngineChoice("torch", None, "engine torch: requested", verified=True)
    built, tolerance, why = _candidates(module, request, precision, torch_forward,
                                        threads or torch.get_num_threads())
    inputs = random_inputs(module)
    reference = torch_forward(inputs)
    diffs = {}
    for name in list(built):
        diff = diffs[name] = built[name].difference(built[name](inputs), reference)
        if not diff <= tolerance[name]:
            why[name] = f"outputs differ from fp32 torch by {diff:.2g} (tolerance " \
                        f"{tolerance[name]:g})"
            del built[name]
    if not built:
        reason = "; ".join(f"{n}: {w}" for n, w in why.items())
        return EngineChoice("torch", None, f"engine torch ({reason})", verified=True)
    steps = {"torch": lambda: torch_forward(inputs)}
    steps.update((name, lambda f=f: f(inputs)) for name, f in built.items())
    if request == "auto" or precision == "auto":
        times = {k: v * 1e3 for k, v in best_times(steps, _rounds(steps)).items()}
        best = min(times, key=times.get)
        summary = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(times.items(),
                                                                 key=lambda kv: kv[1]))
        reason = f"engine {best}: fastest here ({summary}; largest relative difference " \
                 "to fp32 torch: " + ", ".join(f"{k} {diffs[k]:.1g}" for k in built) + ")"
        if why:
            reason += "; " + "; ".join(f"{n}: {w}" for n, w in why.items())
    else:
        times, best = {}, request
        reason = f"engine {best}: requested"
    forward = built.get(best)
    return EngineChoice(best, forward, reason, times, verified=forward is None,
                        tolerance=tolerance.get(best, TOLERANCE))


def first_call_check(choice: EngineChoice, got: Outputs, want: Outputs) -> EngineChoice:
    """After the first real call: keep ``choice`` if its outputs equal torch's, else torch."""
    diff = choice.forward.difference(got, want)
    if diff <= choice.tolerance:
        choice.verified = True
        return choice
    log.warning("engine %s: outputs on the first call differ from torch by %.2g (tolerance "
                "%g); using torch", choice.name, diff, choice.tolerance)
    return EngineChoice("torch", None, f"engine torch: {choice.name} differed by {diff:.2g} "
                        "on the first call", verified=True)


__all__ = ["ENGINES", "ENGINE_ENV", "TOLERANCE", "BF16_TOLERANCE", "ReducedForward", "EngineChoice", "ExportedForward",
           "choose_engine", "first_call_check", "requested_engine", "difference",
           "build_exported"]
