"""Input shapes without an export of their own: one shape-generic export serves them all.

An image pyramid (MTCNN's P-Net: one input shape per scale, and new scales for every image
size) and a second stage fed however many candidates the first one found (R-Net and O-Net: a
new batch size at nearly every image) bring more input shapes than fixed-shape exports can
be made and timed for. pycaffe's fast.py gives the load's shape, and shapes the net keeps
coming back to, fixed-shape exports of their own; for every other shape the engine is chosen
once more, among *shape-generic* exports (every input axis but the channels left free:
``choose_engine(..., any_shape=True)``), each checked against torch at the shape that
brought the choice and at three shapes near it (``nearby_shapes``), and timed against torch
there. The engine kept serves every later shape from the same loaded model, bound to buffers
of that shape (the last ``PLANS_KEPT`` shapes keep theirs). The first call at each new shape
is also checked against torch until ``CHECKED_SHAPES`` shapes have passed; a difference
sends the net to torch, as a difference on a first call always does.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from caffe_compat.engine.backends.engine import EngineChoice, EnginePlan

PLANS_KEPT = 48         # shapes whose bound buffers are kept (a photo's MTCNN pyramid: ~10-20)
PLANS_BYTES = 1 << 30   # and at most this much of the net's blobs at those shapes, summed
CHECKED_SHAPES = 8      # new shapes whose first call is checked against torch


class AnyShape:
    """The shape-generic choice of one net and the per-shape choices made from it."""

    def __init__(self, choice: EngineChoice, key: tuple, exported_from):
        # ``key`` and ``exported_from``: the weights the export was made from (fast.py)
        self.choice, self.key, self.exported_from = choice, key, exported_from
        self._choices: OrderedDict[tuple, EngineChoice] = OrderedDict()
        self._bytes: dict[tuple, int] = {}        # each kept shape's blobs, float32 bytes
        self.passed = 0                 # shapes whose first call matched torch

    def choice_for(self, shapes: dict[str, tuple]) -> EngineChoice:
        """The choice at input ``shapes``: the chosen engine bound for them (torch, or
        torch under bf16, serve any shape as they are)."""
        base = self.choice
        if not isinstance(base.forward, EnginePlan):
            return base
        key = tuple(shapes.values())
        choice = self._choices.pop(key, None)
        if choice is None:
            choice = EngineChoice(base.name, base.forward.at(shapes), base.reason, base.times_ms,
                                  verified=self.passed >= CHECKED_SHAPES,
                                  tolerance=base.tolerance)
            self._bytes[key] = _blob_bytes(base.forward, shapes)
        self._choices[key] = choice
        # an OpenVINO request holds its own activations for its shape: kept plans of a large
        # net at large sizes would add up to gigabytes (the count alone bounds a small net's)
        while len(self._choices) > 1 and (len(self._choices) > PLANS_KEPT or
                                          sum(self._bytes.values()) > PLANS_BYTES):
            old, _ = self._choices.popitem(last=False)
            self._bytes.pop(old, None)
        return choice

    def owns(self, choice: EngineChoice) -> bool:
        return any(c is choice for c in self._choices.values())


def _blob_bytes(plan: EnginePlan, shapes: dict[str, tuple]) -> int:
    """The float32 bytes of every blob of the net at these input shapes (0 where the net's
    shape rules cannot say): a bound on what a runtime keeps for them."""
    try:
        return 4 * sum(math.prod(s) for s in plan.infer_shapes(shapes).values())
    except Exception:   # noqa: BLE001 - no estimate: the count of plans bounds it
        return 0


__all__ = ["AnyShape", "PLANS_KEPT", "PLANS_BYTES", "CHECKED_SHAPES"]
