"""The plan and its one executor: every forward pass of a net runs through ``execute``.

A plan is a list of ``Step`` (what to call, on which named blobs, what to drop after). The
NetModule builds the layer-by-layer plan (one step per layer, every blob kept); the passes
of ``engine/net/passes.py`` rewrite it into the lean training plan and the fused inference
plan; ``caffe time`` and pycaffe's layer-at-a-time runs execute slices of it with hooks.

``execute`` is also the one place that applies the per-step rules: a ``full_precision``
step (losses, softmax, accuracy) runs in float32 on float32 copies of reduced bottoms under
bf16/fp16 autocast; a step marked ``detach`` cuts the gradient of those bottoms; an alias
step (``call`` None) hands its bottom on as every top.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from caffe_compat.engine.layers.base import REDUCED_DTYPES


@dataclass
class Step:
    """One step of a plan."""
    index: int                           # the NetModule layer it stands for (names, errors)
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    detach: tuple[bool, ...] = ()        # per bottom: cut the gradient (propagate_down / labels)
    release: tuple[str, ...] = field(default=())  # blobs last used here (dropped in lean runs)
    fn: Callable | None = None           # the layer or the op replacing it; None: alias
    full_precision: bool = False         # float32 under autocast (the layer's declaration)
    feed: bool = False                   # an Input layer: its tops come from the caller
    name: str = ""                       # the layer's name, for messages
    direct: bool = False                 # call a module's forward, skipping its hooks
    # the form the layer offers for the planned shapes (``Layer.specialized``), called in
    # place of ``fn``: a field, so ``dataclasses.replace`` keeps it as it keeps the rest
    specialized: Callable | None = field(default=None, repr=False, compare=False)
    call: Callable | None = field(init=False, repr=False, compare=False)
    cuts: bool = field(init=False, repr=False, compare=False)
    simple: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # A fused plan calls modules through ``forward``: nn.Module.__call__'s hook checks
        # cost more than a small layer on a batch-1 forward. Plans that run the net's own
        # layers keep __call__, so a user's forward hooks on a layer still fire.
        direct = self.direct and isinstance(self.fn, nn.Module)
        self.call = self.specialized or (self.fn.forward if direct else self.fn)
        self.cuts = any(self.detach)
        # one bottom, one top, a call, no per-step rule: the executor's short path
        self.simple = (len(self.bottoms) == 1 and len(self.tops) == 1 and self.fn is not None
                       and not (self.feed or self.full_precision or self.cuts))


class Hooks(Protocol):
    """What an observer of ``execute`` may do around each step (``caffe time``)."""

    def before(self, step: Step, args: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def after(self, step: Step, args: list[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        ...


def execute(plan: Sequence[Step], blobs: dict[str, torch.Tensor],
            inputs: Mapping[str, torch.Tensor] | None = None, start: int = 0,
            end: int | None = None, keep_all: bool = True,
            record: dict[str, torch.Tensor] | None = None, hooks: Hooks | None = None,
            source: str = "<net>") -> dict[str, torch.Tensor]:
    """Run ``plan[start..end]`` (inclusive) on ``blobs`` (updated and returned).

    ``inputs`` feeds the tops of ``feed`` steps. Without ``keep_all`` each step's
    ``release`` blobs are dropped after it. ``record`` receives the first tensor bound to
    each blob name (an in-place blob's diff in Caffe is the gradient of that first value).
    ``hooks`` see each step's bottoms before it runs and its tops after."""
    end = len(plan) - 1 if end is None else end
    short = hooks is None and record is None      # no observer: simple steps go straight
    for pos in range(start, end + 1):
        step = plan[pos]
        if short and step.simple and step.bottoms[0] in blobs:
            # most steps of a net; on a batch-1 forward of a small net the general path's
            # list building costs as much as a layer (MTCNN R-Net 0.24 -> 0.17 ms)
            out = step.call(blobs[step.bottoms[0]])
            blobs[step.tops[0]] = out[0] if out.__class__ in _SEQUENCES else out
            if not keep_all:
                for b in step.release:
                    blobs.pop(b, None)
            continue
        if step.feed:
            args: list[torch.Tensor] = []
            outs = _fed(plan, step, inputs or {}, source)
            if hooks is not None:
                hooks.before(step, args)
        else:
            try:
                args = [blobs[b] for b in step.bottoms]
            except KeyError as exc:
                raise KeyError(f"{source}: blob '{exc.args[0]}' needed by layer "
                               f"'{step.name}' has not been computed") from None
            if step.cuts:
                args = [t.detach() if cut else t for t, cut in zip(args, step.detach)]
            if hooks is not None:
                args = hooks.before(step, args)
            if step.call is None:
                outs = tuple(args) * len(step.tops)
            else:
                if step.full_precision and any(t.dtype in REDUCED_DTYPES for t in args):
                    outs = _in_float32(step.call, args)
                else:
                    outs = step.call(*args)
                if not isinstance(outs, (tuple, list)):
                    outs = (outs,)
        if hooks is not None:
            hooks.after(step, args, outs)
        for t, value in zip(step.tops, outs):
            blobs[t] = value
            if record is not None and t not in record:
                record[t] = value
        if not keep_all:
            for b in step.release:
                blobs.pop(b, None)
    return blobs


_SEQUENCES = (tuple, list)


def _fed(plan: Sequence[Step], step: Step, inputs: Mapping[str, torch.Tensor],
         source: str) -> tuple:
    missing = [t for t in step.tops if t not in inputs]
    if missing:
        names = ", ".join(n for s in plan if s.feed for n in s.tops)
        raise KeyError(f"{source}: input blob '{missing[0]}' was not fed (inputs are {names})")
    return tuple(inputs[t] for t in step.tops)


def mark_releases(plan: list[Step], keep: set[str]) -> None:
    """Record where each blob is used for the last time, so a lean run can drop it."""
    last_use: dict[str, int] = {}
    for pos, step in enumerate(plan):
        for b in step.bottoms:
            last_use[b] = pos
    for pos, step in enumerate(plan):
        step.release = tuple(b for b in set(step.bottoms)
                             if last_use[b] == pos and b not in keep and b not in step.tops)


def _in_float32(call, args: list[torch.Tensor]):
    """Run a ``full_precision`` step outside autocast on float32 copies of reduced bottoms
    (autocast would otherwise keep a loss or an accuracy in bf16: 3 significant digits)."""
    args = [t.float() if t.dtype in REDUCED_DTYPES else t for t in args]
    with torch.autocast(args[0].device.type, enabled=False):
        return call(*args)


def partition(plan: Sequence[Step], input_names: Sequence[str], output_names: Sequence[str],
              admits: Callable[[Step], bool]) -> tuple[list[Step], list[Step], list[str]]:
    """(prefix, suffix, prefix outputs) of ``plan``.

    A step joins the prefix when ``admits`` it and everything it reads comes from the inputs or
    the prefix; every other step, and what reads its tops, joins the suffix. A step that
    would write a name the suffix reads or writes stays in the suffix too, so running the
    whole prefix and then the suffix computes what the plan computes. The prefix's outputs are
    the blobs the suffix reads and the net outputs it makes."""
    in_prefix = {name: True for name in input_names}
    suffix_names: set[str] = set()
    prefix, suffix = [], []
    for step in plan:
        ready = all(in_prefix.get(b, False) for b in step.bottoms)
        clash = any(t in suffix_names for t in step.tops)
        if admits(step) and ready and not clash:
            prefix.append(step)
            in_prefix.update((t, True) for t in step.tops)
        else:
            suffix.append(step)
            suffix_names.update(step.bottoms)
            suffix_names.update(step.tops)
            in_prefix.update((t, False) for t in step.tops)
    made = {t for step in prefix for t in step.tops}
    read_later = {b for step in suffix for b in step.bottoms}
    outputs = [n for n in dict.fromkeys([*(b for s in suffix for b in s.bottoms), *output_names])
               if n in made and (n in read_later or (n in output_names and in_prefix.get(n)))]
    return prefix, suffix, outputs
