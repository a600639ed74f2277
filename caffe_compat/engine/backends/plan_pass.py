"""An ONNX runtime as a pass of the inference plan: the exported prefix becomes one Step.

``engine_plans(module, runtimes, threads, shapes)`` takes the NCHW fused inference plan
(engine/net/fuse.py), splits it (split.py: what each layer's ``exports_to_onnx`` allows),
exports the prefix once for the given input shapes and loads it in each runtime. The plan
each runtime gets is ``[engine step, *suffix steps]``: the engine step's call
(``EngineCall``) runs the runtime on buffers bound at load, the suffix steps (an SSD's
DetectionOutput) are the fused plan's own. ``EnginePlan`` runs that plan through the one
executor (engine/net/plan.py ``execute``), so pycaffe's ``forward``, ``caffe test``,
``caffe time``, ``classify`` and the benchmarks all run it as they run every other plan.

Per call the engine step does no Python work beyond the runtime call when it is handed its
own bound input tensors (``EnginePlan.inputs``: pycaffe copies the input blobs straight into
them); any other tensor of the planned shape is copied in first. Its outputs are tensors over
the runtime's bound output buffers: valid until the step runs again (pycaffe copies them
into the output blobs; the suffix reads them before that).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Callable, Sequence

import numpy as np
import torch

from caffe_compat.engine.backends.onnx_export import export_onnx
from caffe_compat.engine.backends.runners import BackendUnavailable, runner_class
from caffe_compat.engine.backends.split import Split, split_steps
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import NetModule
from caffe_compat.engine.net.plan import Step, execute
from caffe_compat.formats.errors import first_line

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class EngineCall:
    """The call of the engine step: the runtime on its bound buffers."""

    def __init__(self, runner, shapes: Sequence[torch.Size]):
        self.runner = runner
        self.name = runner.name
        self.inputs = [torch.from_numpy(a) for a in runner.inputs]
        self.outputs = tuple(torch.from_numpy(a) for a in runner.outputs)
        self.shapes = list(shapes)
        self._run = runner.run

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for given, bound in zip(tensors, self.inputs):
            if given is not bound:
                if given.shape != bound.shape:
                    raise ValueError(f"engine {self.name}: input of shape {tuple(given.shape)}"
                                     f"; the export is for {tuple(bound.shape)}")
                bound.copy_(given)
        self._run()
        return self.outputs

    def bind_output(self, index: int, array) -> bool:
        """Have the runtime write output ``index`` straight into ``array`` from now on
        (False, nothing changed, where it is not a float32 C-contiguous array of the
        output's shape)."""
        current = self.runner.outputs[index]
        fits = array.dtype == current.dtype and array.shape == current.shape and \
            array.flags.c_contiguous
        if not fits:          # an array of the caller's bound before must not be written
            array = np.zeros(current.shape, current.dtype)
        self.runner.bind_output(index, array)
        outputs = list(self.outputs)
        outputs[index] = torch.from_numpy(array)
        self.outputs = tuple(outputs)
        return fits


class EnginePlan:
    """A fused inference plan whose exportable prefix is one ``EngineCall`` step."""

    def __init__(self, split: Split, call: EngineCall, source: str, any_shape: bool = False,
                 infer_shapes: Callable[[dict], dict] | None = None):
        self.split, self.call, self.name = split, call, call.name
        self.source = source
        self.any_shape = any_shape     # a shape-generic export: ``at`` serves other shapes
        self.infer_shapes = infer_shapes      # the net's blob shapes for input shapes
        layers = len(split.prefix.plan)
        step = Step(index=split.prefix.plan[0].index, bottoms=tuple(split.prefix_inputs),
                    tops=tuple(split.prefix_outputs), fn=call,
                    name=f"{call.name} ({layers} exported steps)")
        self.plan = [step, *split.suffix]
        self.output_names = list(split.output_names)
        # pycaffe's input blobs are copied straight into the runtime's input buffers
        self.inputs: Tensors = dict(zip(split.prefix_inputs, call.inputs))
        self.input_arrays = dict(zip(split.prefix_inputs, call.runner.inputs))
        self.settings = getattr(call.runner, "settings", "")

    def bind_outputs(self, arrays: dict) -> list[str]:
        """The exported outputs among ``arrays`` (name -> numpy array) that the runtime
        writes straight into from now on (pycaffe's output blobs: no copy per call)."""
        names = self.split.prefix_outputs
        return [n for i, n in enumerate(names) if self.call.bind_output(
            i, arrays.get(n, self.call.runner.outputs[i]))
            and n in arrays]

    def accepts(self, inputs: Tensors) -> bool:
        """The export has fixed shapes: a reshaped input blob needs another plan."""
        return all(inputs[n].shape == t.shape for n, t in self.inputs.items())

    def at(self, shapes: dict[str, tuple]) -> "EnginePlan":
        """The same loaded runtime (an ``any_shape`` export) bound to buffers of these input
        shapes: a plan of its own, this one left as it is (itself at its own shapes)."""
        ins = [tuple(shapes[n]) for n in self.split.prefix_inputs]
        if ins == [tuple(s) for s in self.call.shapes]:
            return self
        if not self.any_shape:
            raise ValueError(f"engine {self.name}: the export is for fixed input shapes")
        runner = self.call.runner
        call = EngineCall(runner.rebound(ins, self._output_shapes(ins)), ins)
        return EnginePlan(self.split, call, self.source, True, self.infer_shapes)

    def _output_shapes(self, ins: list[tuple]) -> list[tuple]:
        """The exported outputs' shapes at input shapes ``ins``: the net's own shape rules
        (Caffe's Reshape pass), else one run of the runtime. A run cost as much as the
        forward itself: an MTCNN pyramid over a folder of photos brings a new shape at
        nearly every call. Shapes the rules get wrong fail the run loudly (onnxruntime
        refuses an output buffer of another shape), never silently."""
        if self.infer_shapes is not None:
            try:
                blobs = self.infer_shapes(dict(zip(self.split.prefix_inputs, ins)))
                return [tuple(blobs[n]) for n in self.split.prefix_outputs]
            except Exception:   # noqa: BLE001 - no rule for these shapes: the runtime decides
                log.debug("engine %s: output shapes at %s from a run", self.name, ins)
        return self.call.runner.output_shapes(ins)

    def run(self, inputs: Tensors) -> Tensors:
        """The net's outputs for ``inputs`` (``self.inputs`` themselves: no copy)."""
        blobs = execute(self.plan, dict(inputs), source=self.source)
        return {n: blobs[n] for n in self.output_names}

    __call__ = run

    def difference(self, outputs: Tensors, reference: Tensors) -> float:
        """How far the last call's exported part is from torch computing the same blobs.

        The exported part is what this engine computes; the suffix runs torch's own layers
        on it. Comparing there, not at the net's outputs, keeps a DetectionOutput's
        thresholds (a score at 0.3000001 against 0.2999999 keeps one more box) from
        turning a 1e-7 difference into a different detection list."""
        from caffe_compat.engine.backends.engine import difference
        if not self.split.suffix:
            return difference(outputs, reference)
        with torch.no_grad():
            want = self.split.prefix(*self.call.inputs)
        return difference(dict(zip(self.split.prefix_outputs, self.call.outputs)),
                          dict(zip(self.split.prefix_outputs, want)))


def engine_plans(module: NetModule, runtimes: list[str], threads: int,
                 shapes: dict[str, tuple], any_shape: bool = False
                 ) -> tuple[dict[str, EnginePlan], dict[str, str]]:
    """The engine plans among ``runtimes`` that load for input ``shapes``, and why the
    others did not. ``any_shape`` exports with every input axis but the channels free (the
    batch of a 2-D input), so ``EnginePlan.at`` serves other shapes from the same load."""
    split = split_steps(fused_for_inference(module).plan, module)
    if split.prefix is None:
        return {}, {n: "no layer at the start of the net can be exported" for n in runtimes}
    example = [torch.rand(*shapes[n]) for n in split.prefix_inputs]
    with torch.no_grad():
        made = split.prefix(*example)
    built, why = {}, {}
    with tempfile.TemporaryDirectory(prefix="caffe-compat-engine-") as workdir:
        path = os.path.join(workdir, "prefix.onnx")
        try:
            _export(split, example, path, _free_axes(split, example) if any_shape else None)
        except Exception as exc:   # noqa: BLE001 - exporter errors come in many types
            text = first_line(exc, 200)
            return {}, {n: f"the ONNX export failed ({text})" for n in runtimes}
        for name in runtimes:
            try:
                runner = runner_class(name)(path, split.prefix_inputs, split.prefix_outputs,
                                            threads, [t.shape for t in example],
                                            [t.shape for t in made])
            except BackendUnavailable as exc:
                why[name] = str(exc)
                continue
            except Exception as exc:   # noqa: BLE001 - a runtime that cannot load the graph
                why[name] = f"{name} could not load the export ({first_line(exc, 200)})"
                continue
            built[name] = EnginePlan(split, EngineCall(runner, [t.shape for t in example]),
                                     module.source, any_shape, module.infer_shapes)
    return built, why


def _free_axes(split: Split, example: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    """Each input's free axes: all but the channels (axis 1) of an image blob, the first
    of any other. The symbols are per input: nothing claims two inputs share a size."""
    return {name: {axis: f"{name}_{axis}" for axis in range(t.dim())
                   if axis == 0 or (t.dim() == 4 and axis != 1)}
            for name, t in zip(split.prefix_inputs, example)}


def _export(split: Split, example: list[torch.Tensor], path: str,
            dynamic_axes: dict | None = None) -> None:
    """The quick TorchScript-traced export; for fixed shapes, the dynamo exporter where
    tracing fails (a shape-generic export is the tracer's or none)."""
    try:
        export_onnx(split.prefix, example, path, split.prefix_inputs, split.prefix_outputs,
                    dynamo=False, dynamic_axes=dynamic_axes)
    except Exception:   # noqa: BLE001 - then the slower exporter decides
        if dynamic_axes:
            raise
        export_onnx(split.prefix, example, path, split.prefix_inputs, split.prefix_outputs)


__all__ = ["EngineCall", "EnginePlan", "engine_plans"]
