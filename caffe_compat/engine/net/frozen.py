"""TorchScript-frozen inference: the part of a fused plan a trace can keep, traced, frozen and
optimised (oneDNN weight prepacking, conv+ReLU fusion); the rest run by the executor.

A trace records the tensor ops one example call made and replays them. A layer that computes
on the host (numpy), branches on values or makes a data-dependent number of rows (SSD's
DetectionOutput, ROIPooling, Filter, Python layers) leaves no ops to replay: its example
output would be baked into the graph as a constant, and every later input would get the
example's detections. Such a layer declares ``traceable = False`` (engine/layers/base.py);
``partition`` keeps it, and everything that reads its tops, out of the traced prefix, and
``FrozenNet`` runs those steps through the one executor on the prefix's outputs.
"""
from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from caffe_compat.engine.net.denormals import FlushDenormals
from caffe_compat.engine.net.fuse import FusedNet
from caffe_compat.engine.net.plan import Step, execute, partition


def traceable(step: Step) -> bool:
    """The step's op is replayed correctly by a trace (an alias has no op at all)."""
    return step.fn is None or bool(getattr(step.fn, "traceable", True))


def sub_net(fused: FusedNet, steps: Sequence[Step], outputs: Sequence[str],
            suffix: str) -> FusedNet:
    """A FusedNet running ``steps`` of ``fused`` (same inputs and layout) to ``outputs``.

    The steps are copies that keep their specialised calls: a FusedNet marks the releases of
    its own list, which must not change what ``fused`` drops."""
    names = SimpleNamespace(name=fused.name + suffix, source=fused.source,
                            input_names=fused.input_names, output_names=list(outputs))
    part = FusedNet(names, [copy.copy(step) for step in steps])
    part.channels_last = fused.channels_last        # its weights are already in that layout
    return part.eval()


class FrozenNet(nn.Module):
    """A frozen TorchScript prefix and the executor for the steps a trace cannot keep (none
    when the whole plan traces), run with subnormals flushed as a FusedNet is."""

    def __init__(self, fused: FusedNet, prefix: torch.jit.ScriptModule,
                 prefix_outputs: list[str], suffix: list[Step]):
        super().__init__()
        self.name, self.source = fused.name, fused.source
        self.input_names, self.output_names = fused.input_names, fused.output_names
        self.prefix, self.prefix_outputs, self.suffix = prefix, prefix_outputs, suffix
        self.flush_denormals = fused.flush_denormals

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.flush_denormals:
            return self._run(inputs)
        with FlushDenormals():
            return self._run(inputs)

    def _run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        made = self.prefix(*inputs)
        if not self.suffix:
            return made
        blobs = dict(zip(self.input_names, inputs))
        blobs.update(zip(self.prefix_outputs, made))
        execute(self.suffix, blobs, source=self.source)
        return tuple(blobs[name] for name in self.output_names)


def frozen_for_inference(fused: FusedNet, example_inputs: Sequence[torch.Tensor]):
    """``fused`` traced, frozen and optimised by TorchScript for these input shapes, as a
    ``FrozenNet`` (the steps a trace cannot keep run after the frozen graph).

    Raises RuntimeError naming the net when nothing can be frozen or tracing fails."""
    prefix, suffix, outputs = partition(fused.plan, fused.input_names, fused.output_names,
                                        traceable)
    if not suffix:
        return FrozenNet(fused, _freeze(fused, example_inputs), fused.output_names, [])
    if not prefix or not outputs:
        raise RuntimeError(f"net '{fused.name}' cannot be frozen with TorchScript: its first "
                           f"steps ({suffix[0].name}) cannot be traced")
    frozen = _freeze(sub_net(fused, prefix, outputs, "_prefix"), example_inputs)
    return FrozenNet(fused, frozen, outputs, suffix)


def _freeze(net: FusedNet, example_inputs: Sequence[torch.Tensor]) -> torch.jit.ScriptModule:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shapes are fixed
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(net.eval(), tuple(example_inputs), check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as exc:   # noqa: BLE001 - tracing errors come in many types
        raise RuntimeError(f"net '{net.name}' cannot be frozen with TorchScript: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           ) from exc


__all__ = ["FrozenNet", "frozen_for_inference", "sub_net", "traceable"]
