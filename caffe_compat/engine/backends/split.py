"""A fused TEST plan cut in two: the steps an ONNX exporter can express, and the rest.

``split_steps(plan, module)`` cuts a fused inference plan (engine/net/fuse.py, NCHW) with
``engine.net.plan.partition``, admitting the steps whose layer declares ``exports_to_onnx``
(an alias step always can): DetectionOutput, ROIPooling, Filter, Python layers and whatever reads
their tops go to the suffix. An SSD net thus exports everything up to its DetectionOutput,
which then runs in torch on the exported net's tensors (engine/backends/plan_pass.py makes
the prefix one step).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from caffe_compat.engine.net.fuse import FusedNet, fused_for_inference
from caffe_compat.engine.net.module import NetModule
from caffe_compat.engine.net.plan import Step, partition


@dataclass
class Split:
    prefix: FusedNet | None         # None: nothing exportable
    suffix: list[Step]              # fused-plan steps run in torch after the prefix
    prefix_inputs: list[str]
    prefix_outputs: list[str]
    output_names: list[str]         # the net's outputs


class _Names:
    """What FusedNet needs to know of a net: its name, inputs and outputs."""

    def __init__(self, name: str, inputs: Sequence[str], outputs: Sequence[str]):
        self.name, self.input_names, self.output_names = name, list(inputs), list(outputs)
        self.source = name                    # what the executor's messages name


def exportable(step: Step, module: NetModule) -> bool:
    """The step's layer declares that an exporter can express it (aliases run nothing)."""
    return step.fn is None or bool(module.layers[step.index].exports_to_onnx)


def split_steps(plan: Sequence[Step], module: NetModule) -> Split:
    """The prefix/suffix split of the fused ``plan`` (see the module docstring)."""
    prefix_steps, suffix_steps, outputs = partition(
        plan, module.input_names, module.output_names, lambda step: exportable(step, module))
    if not prefix_steps or not outputs:
        return Split(None, list(plan), [], [], list(module.output_names))
    # fresh steps: FusedNet marks releases on its own list (the suffix keeps every blob);
    # ``Step.specialized`` carries the fused plan's forms over, so the export records them
    prefix = FusedNet(_Names(module.name + "_prefix", module.input_names, outputs),
                      [dataclasses.replace(step) for step in prefix_steps])
    return Split(prefix.eval(), suffix_steps, list(module.input_names), outputs,
                 list(module.output_names))


def split_plan(module: NetModule) -> Split:
    """``split_steps`` of ``module``'s NCHW fused inference plan."""
    return split_steps(fused_for_inference(module).plan, module)


__all__ = ["Split", "split_steps", "split_plan", "exportable"]
