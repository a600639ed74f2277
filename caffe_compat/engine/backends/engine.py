"""Inference engines for a TEST net, chosen by name or by measurement.

``engine="torch"`` is the fused plan (engine/net/fuse.py). ``"onnxruntime"`` and
``"openvino"`` are a pass of that plan (plan_pass.py): the net's exportable prefix becomes
one step running in that runtime, the rest (an SSD's DetectionOutput, R-CNN's ROIPooling)
stays torch steps; the plan runs through the one executor like every other.

``"auto"`` builds every engine whose package is installed for the net's *actual* input
shapes (pycaffe decides again after a reshape), checks its outputs against torch's on random
inputs, then times the candidates as pycaffe calls them (inputs copied into the engine's
bound buffers; torch's fused forward): alternating rounds of one call each, the order
rotated each round, as many rounds as fit in ``BUDGET_S`` (1 s: 200 rounds, the most, for
a 1 ms net with three candidates; 33 for a 10 ms one), ``MIN_ROUNDS`` (5) for slower nets;
from ``CLEAR_AFTER`` (10) rounds on, every 5 rounds, the timing ends early once the leader's
upper quartile is below every other candidate's lower quartile.
**The rule: the candidate with the lowest median time is kept** (the median of alternated
single calls: a neighbour's burst of load moves it least).

Outputs must equal the torch path's within ``TOLERANCE``: max |engine - torch| over an output,
divided by max(1, max |torch output|); for a split net, over the blobs the engine computes
(the inputs of its DetectionOutput, say: see ``EnginePlan.difference``). That is
checked at load on random inputs and again on the first real call
(``EngineChoice.verified``); a difference there, a failed export or a missing package leaves
the net on torch with a log line saying why. ``precision="auto"``
also considers, on CPUs with native bf16 (AMX, AVX512-BF16), the torch path under bf16
autocast (``torch-bf16``) and OpenVINO computing in bf16 (``openvino-bf16``, where
OpenVINO is a candidate), each within ``BF16_TOLERANCE`` of fp32 and kept only where it
measures fastest; fp32 stays the default.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from caffe_compat.engine.backends import ENGINES
from caffe_compat.engine.backends.plan_pass import EnginePlan, engine_plans
from caffe_compat.engine.backends.runners import REDUCED_OF, RUNNERS, runner_class
from caffe_compat.engine.net.module import NetModule
from caffe_compat.formats.errors import first_line

log = logging.getLogger(__name__)

ENGINE_ENV = "CAFFE_COMPAT_ENGINE"
TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2     # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, summed over layers
MIN_ROUNDS, MAX_ROUNDS = 5, 200
BUDGET_S = 1.0            # seconds of timing at load, beyond the MIN_ROUNDS
CLEAR_AFTER = 10          # rounds after which a clear leader ends the timing early

Outputs = dict[str, torch.Tensor]


def requested_engine(engine: str | None) -> str:
    """``engine``, else $CAFFE_COMPAT_ENGINE, else "torch"; unknown names are an error."""
    name = (engine or os.environ.get(ENGINE_ENV) or "torch").strip().lower()
    if name not in ENGINES:
        origin = "" if engine else f"${ENGINE_ENV}: "     # not in the call that raised
        raise ValueError(f"{origin}engine {name!r}: expected one of {', '.join(ENGINES)}")
    return name


def difference(got: Outputs, want: Outputs) -> float:
    """Largest relative difference over the outputs: inf where a shape differs or a value
    is NaN on one side only (Python's max() would skip a NaN: an engine returning NaN
    passed); equal infinities and NaN on both sides count as equal."""
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        if tuple(g.shape) != tuple(w.shape):
            return float("inf")
        if w.numel():
            g, w = g.float(), w.float()
            same = (g == w) | (g.isnan() & w.isnan())
            gap = float(torch.where(same, 0.0, (g - w).abs()).max())
            finite = w[w.isfinite()]
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            worst = max(worst, float("inf") if gap != gap else gap / scale)
    return worst


def random_inputs(shapes: dict[str, tuple], seed: int = 0) -> Outputs:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(*shape, generator=gen) for n, shape in shapes.items()}


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


def _candidates(module, request, precision, torch_forward, threads, shapes, any_shape=False):
    """({name: forward}, {name: tolerance}, {name: why not}) of the engines to consider."""
    names = [] if request == "torch" else list(RUNNERS) if request == "auto" else [request]
    reduced = precision == "auto" and _native_bf16()
    if reduced:          # the bf16 runners of the engines asked for (one export for all)
        names += [n for n, full in REDUCED_OF.items() if full in names]
    why = {}
    if any_shape:
        why = {n: f"{n} serves fixed input shapes only" for n in names
               if not runner_class(n).shape_generic}
        names = [n for n in names if n not in why]
    built, failed = engine_plans(module, names, threads, shapes, any_shape) if names \
        else ({}, {})
    why.update(failed)
    tolerance = {name: BF16_TOLERANCE if name in REDUCED_OF else TOLERANCE for name in built}
    if reduced:
        built[ReducedForward.name] = ReducedForward(torch_forward)
        tolerance[ReducedForward.name] = BF16_TOLERANCE
    elif precision == "auto":
        why[ReducedForward.name] = "this CPU has no native bf16 (AMX, AVX512-BF16)"
    return built, tolerance, why


def _native_bf16() -> bool:
    from caffe_compat.engine.precision import candidates
    return "bf16" in candidates(torch.device("cpu"))


def requested_as(name: str) -> str:
    """The engine a caller names to get the engine ``name`` (``openvino`` for
    ``openvino-bf16``, which ``precision="auto"`` offers)."""
    return REDUCED_OF.get(name, name)


def median_times(steps: dict[str, Callable[[], object]], budget_s: float = BUDGET_S,
                 rounds: tuple[int, int] = (MIN_ROUNDS, MAX_ROUNDS)) -> dict[str, float]:
    """Each step's median wall time (seconds) over alternating rounds: one warm-up call
    each, then rounds of one call per step, the order rotated each round, as many rounds
    as fit in ``budget_s`` within ``rounds``. The median of single calls, alternated, is
    what a burst of load from a neighbour moves least (the best-of-7 it replaces picked
    torch at 12.1 ms over OpenVINO at 6.0 ms for an MTCNN O-Net at batch 16)."""
    names = list(steps)
    t0 = time.perf_counter()
    for step in steps.values():
        step()
    warm = time.perf_counter() - t0
    count = int(min(rounds[1], max(rounds[0], budget_s / warm if warm else rounds[1])))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(count):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        done = r + 1
        if done >= CLEAR_AFTER and done % 5 == 0 and done < count and _clear_leader(times):
            break
    return {n: statistics.median(v) for n, v in times.items()}


def _clear_leader(times: dict[str, list[float]]) -> bool:
    """Whether the candidate of lowest median is ahead of every other beyond the spread of
    either (its upper quartile below their lower ones): more rounds would not change the
    choice. An MTCNN folder's 15 load-time choices spent 11 of their 14 s timing winners
    this clear (OpenVINO 4.5 ms against torch 6.9 and onnxruntime 7.8, say)."""
    if len(times) < 2:
        return True
    quartiles = {n: statistics.quantiles(v, n=4) for n, v in times.items()}
    leader = min(quartiles, key=lambda n: quartiles[n][1])
    return all(quartiles[leader][2] < q[0] for n, q in quartiles.items() if n != leader)


def _bound_call(forward, inputs: Outputs) -> Callable[[], object]:
    """One call as pycaffe makes it: an engine plan gets the inputs copied into its bound
    buffers, the torch paths get them as tensors."""
    if isinstance(forward, EnginePlan):
        def call():
            for name, bound in forward.inputs.items():
                bound.copy_(inputs[name])
            return forward.run(forward.inputs)
        return call
    return lambda: forward(inputs)


def choose_engine(module: NetModule, request: str, torch_forward: Callable[[Outputs], Outputs],
                  threads: int | None = None, precision: str = "fp32",
                  shapes: dict[str, tuple] | None = None,
                  any_shape: bool = False) -> EngineChoice:
    """The engine for ``module`` (see the module docstring) at input ``shapes`` (default:
    the net's); ``torch_forward`` is the torch path (inputs -> outputs).
    ``precision="auto"`` adds the torch path under bf16 autocast where the CPU has native
    bf16, kept only if faster and within ``BF16_TOLERANCE``. ``any_shape`` builds
    shape-generic exports (``EnginePlan.at``), each also checked at ``nearby_shapes``."""
    request = requested_engine(request)
    if request == "torch" and precision != "auto":
        return EngineChoice("torch", None, "engine torch: requested", verified=True)
    shapes = shapes or {n: module.blob_shapes[n] for n in module.input_names}
    built, tolerance, why = _candidates(module, request, precision, torch_forward,
                                        threads or torch.get_num_threads(), shapes, any_shape)
    inputs = random_inputs(shapes)
    diffs = _check(built, tolerance, why, inputs, torch_forward(inputs))
    for other in nearby_shapes(shapes) if any_shape and built else []:
        _check_elsewhere(built, tolerance, why, diffs, other, torch_forward)
    if not built:
        reason = "; ".join(f"{n}: {w}" for n, w in why.items())
        return EngineChoice("torch", None, f"engine torch ({reason})", verified=True)
    steps = {"torch": _bound_call(torch_forward, inputs)}
    steps.update((name, _bound_call(f, inputs)) for name, f in built.items())
    settings = "; ".join(f"{k}: {f.settings}" for k, f in built.items()
                         if getattr(f, "settings", ""))
    if request == "auto" or precision == "auto":
        times = {k: v * 1e3 for k, v in median_times(steps).items()}
        best = min(times, key=times.get)
        summary = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(times.items(),
                                                                 key=lambda kv: kv[1]))
        reason = f"engine {best}: fastest median at {_shape_text(shapes)} ({summary}; " \
                 "largest relative difference to fp32 torch: " + \
                 ", ".join(f"{k} {diffs[k]:.1g}" for k in built) + ")"
        if why:
            reason += "; " + "; ".join(f"{n}: {w}" for n, w in why.items())
    else:
        times, best = {}, request
        reason = f"engine {best}: requested ({_shape_text(shapes)})"
    if settings:
        reason += f" [{settings}]"
    forward = built.get(best)
    return EngineChoice(best, forward, reason, times, verified=forward is None,
                        tolerance=tolerance.get(best, TOLERANCE))


def _check(built: dict, tolerance: dict, why: dict, inputs: Outputs, reference: Outputs,
           where: str = "") -> dict[str, float]:
    """Each candidate's difference from torch's ``reference`` on ``inputs``; a candidate
    that fails or differs by more than its tolerance leaves ``built`` with a reason."""
    diffs = {}
    for name in list(built):
        forward = built[name]
        try:
            if isinstance(forward, EnginePlan):      # bound for these shapes (elsewhere)
                forward = forward.at({n: tuple(t.shape) for n, t in inputs.items()})
            got = _bound_call(forward, inputs)()
        except Exception as exc:   # noqa: BLE001 - a runtime that loads a graph it cannot run
            text = first_line(exc, 200)
            why[name] = f"{name} failed on a test input{where} ({text})"
            del built[name]
            continue
        diff = diffs[name] = forward.difference(got, reference)
        if not diff <= tolerance[name]:
            why[name] = f"outputs differ from fp32 torch by {diff:.2g}{where} (tolerance " \
                        f"{tolerance[name]:g})"
            del built[name]
    return diffs


def _check_elsewhere(built, tolerance, why, diffs, shapes, torch_forward) -> None:
    """``_check`` of the shape-generic candidates at other input ``shapes``, where torch
    itself runs at them (a net with an InnerProduct takes one image size only)."""
    inputs = random_inputs(shapes, seed=1)
    try:
        reference = torch_forward(inputs)
    except Exception:   # noqa: BLE001 - shapes this net cannot take: nothing to compare
        return
    exported = {n: f for n, f in built.items() if isinstance(f, EnginePlan)}
    found = _check(exported, tolerance, why, inputs, reference, f" at {_shape_text(shapes)}")
    for name, forward in list(built.items()):
        if isinstance(forward, EnginePlan) and name not in exported:
            del built[name]                          # failed or differed at these shapes
        elif name in found:
            diffs[name] = max(diffs.get(name, 0.0), found[name])


def nearby_shapes(shapes: dict[str, tuple]) -> list[dict[str, tuple]]:
    """Input shapes near ``shapes`` that a shape-generic export must also get right: one
    more in the batch, and image heights and widths one and two larger (each parity:
    sizes a trace baked in, or a ceil-mode pooling rule, show there)."""
    def moved(batch: int, dh: int, dw: int) -> dict[str, tuple]:
        out = {}
        for name, s in shapes.items():
            s = list(s)
            s[0] += batch
            if len(s) == 4:
                s[2], s[3] = s[2] + dh, s[3] + dw
            out[name] = tuple(s)
        return out
    return [moved(1, 0, 0), moved(0, 1, 2), moved(0, 2, 1)]


def _shape_text(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())


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


__all__ = ["ENGINES", "ENGINE_ENV", "TOLERANCE", "BF16_TOLERANCE", "ReducedForward",
           "EngineChoice", "EnginePlan", "choose_engine", "first_call_check",
           "requested_engine", "requested_as", "difference", "median_times", "nearby_shapes"]
