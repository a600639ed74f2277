"""A fused TEST net cut in two: the part an ONNX exporter can express, and the rest in torch.

``split_plan(module)`` walks the fused plan (engine/net/fuse.py, NCHW) in order. An op joins
the *prefix* when its layer declares ``exports_to_onnx`` and everything it reads comes from
the net's inputs or from the prefix; every other op joins the *suffix* (DetectionOutput,
ROIPooling, Python layers, and whatever reads their tops). The prefix's outputs are the blobs
the suffix reads and the net outputs it makes. An op that would overwrite (in place) a name
the suffix reads or writes stays in the suffix too, so running the whole prefix first and
then the suffix computes what the plan computes. An SSD net thus exports everything up to
its DetectionOutput, which then runs in torch on the exported net's tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from caffe_compat.engine.net.fuse import FusedNet, fused_for_inference
from caffe_compat.engine.net.module import NetModule
from caffe_compat.engine.net.plan import execute


@dataclass
class Split:
    prefix: FusedNet | None         # None: nothing exportable
    suffix: list                    # fused-plan ops run in torch after the prefix
    prefix_inputs: list[str]
    prefix_outputs: list[str]
    output_names: list[str]         # the net's outputs


class _Names:
    """What FusedNet needs to know of a net: its name, inputs and outputs."""

    def __init__(self, name: str, inputs: Sequence[str], outputs: Sequence[str]):
        self.name, self.input_names, self.output_names = name, list(inputs), list(outputs)
        self.source = name                    # what the executor's messages name


def _exportable(op) -> bool:
    if op.fn is None:
        return True                          # an alias (Split, TEST Dropout)
    return bool(getattr(op.fn, "exports_to_onnx", True))


def split_plan(module: NetModule) -> Split:
    """The prefix/suffix split of ``module``'s fused plan (see the module docstring)."""
    fused = fused_for_inference(module)
    in_prefix: dict[str, bool] = {name: True for name in module.input_names}
    suffix_names: set[str] = set()
    prefix_ops, suffix_ops = [], []
    for op in fused.ops:
        ready = all(in_prefix.get(b, False) for b in op.bottoms)
        clash = any(t in suffix_names for t in op.tops)
        if _exportable(op) and ready and not clash:
            prefix_ops.append(op)
            in_prefix.update((t, True) for t in op.tops)
        else:
            suffix_ops.append(op)
            suffix_names.update(op.bottoms)
            suffix_names.update(op.tops)
            in_prefix.update((t, False) for t in op.tops)
    made = {t for op in prefix_ops for t in op.tops}
    read_later = {b for op in suffix_ops for b in op.bottoms}
    outputs = [n for n in dict.fromkeys([*(b for op in suffix_ops for b in op.bottoms),
                                         *module.output_names])
               if n in made and (n in read_later or (n in module.output_names
                                                     and in_prefix.get(n)))]
    if not prefix_ops or not outputs:
        return Split(None, list(fused.ops), [], [], list(module.output_names))
    # fresh ops: FusedNet marks releases on its own list (the suffix keeps every blob)
    prefix = FusedNet(_Names(module.name + "_prefix", module.input_names, outputs),
                      [dataclasses.replace(op) for op in prefix_ops])
    return Split(prefix.eval(), suffix_ops, list(module.input_names), outputs,
                 list(module.output_names))


def run_suffix(ops: list, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The suffix ops on ``blobs`` (the prefix's outputs and the net's inputs), in order,
    through the one executor (every blob kept)."""
    return execute(ops, blobs, source="suffix")


__all__ = ["Split", "split_plan", "run_suffix"]
