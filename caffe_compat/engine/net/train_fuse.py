"""The training pipeline: plan passes that turn a NetModule's layer-by-layer plan into the
lean plan, for the runs that keep no intermediate blob (the solver's training step, a test
pass, ``forward()``). Each pass is ``plan -> plan`` and asks the layers what they can do
(``Layer`` capabilities, engine/layers/base.py), never their type names.

- ``fuse_normalize_affine``: a normalisation that ``absorbs_affine`` (BatchNorm) whose top
  only a ``learned_affine`` layer reads (ResNet's ``BatchNorm`` + ``Scale bias_term``) runs
  as one op with that layer's live gamma and beta as its affine weights: Caffe's arithmetic
  ``gamma * (x - mu) / sqrt(var + eps) + beta`` with the same statistics, updated exactly as
  the normalisation alone updates them. Apart it costs a second activation tensor saved for
  the Scale's backward and two more passes over memory.
- ``alias_copies``: a layer that ``is_alias`` (Split; a Dropout that leaves its input
  unchanged) hands its bottom on as each top (no views, no op).
- ``rectify_in_place``: a rectifier (``rectifier_slope`` >= 0) that alone reads the new tensor
  of a layer whose ``output_not_saved`` rectifies it in place; autograd's version check never
  trips (the writer's backward does not keep its output), and the ReLU's own backward needs
  only its output, which is the same tensor.

Nothing here changes what the blobs hold that a caller sees: a lean run returns only the
outputs (and losses), which no pass touches. Runs that expose every blob (pycaffe,
``keep_all``, a partial run, ``record``) use the layer-by-layer plan.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from caffe_compat.engine.layers.base import Layer
from caffe_compat.engine.net.folded import InPlaceReLU
from caffe_compat.engine.net.plan import Step, mark_releases

if TYPE_CHECKING:
    from caffe_compat.engine.net.module import NetModule


class NormalizeAffine:
    """``affine_layer(norm(x))`` as one normalisation with an affine part.

    A plain object, not an nn.Module: the parameters stay registered once, under their own
    layers, and are read from them at every call (sharing and snapshots replace them)."""

    def __init__(self, norm: Layer, affine_layer: Layer):
        self.norm, self.affine_layer = norm, affine_layer
        self.name = f"{norm.name}+{affine_layer.name}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.norm.absorbs_affine()
        if x.dim() < 2 or x.shape[1] != channels:
            return self.affine_layer(self.norm(x))   # the layers report or handle these
        gamma, beta = self.affine_layer.learned_affine(channels)
        return self.norm.forward_affine(x, gamma, beta)


def plan_readers(plan: list[Step], kept: set[str]) -> dict[tuple[int, str], list[int]]:
    """For each blob version (producing plan position, name): the positions reading it.
    Blobs in ``kept`` (outputs, losses) get a pseudo-reader (-1) so they are never fused."""
    current: dict[str, int] = {}
    readers: dict[tuple[int, str], list[int]] = {}
    for pos, step in enumerate(plan):
        for b in step.bottoms:
            readers.setdefault((current.get(b, -1), b), []).append(pos)
        for t in step.tops:
            current[t] = pos
            readers.setdefault((pos, t), [])
    for name in kept:
        if name in current:
            readers[(current[name], name)].append(-1)
    return readers


def name_free(plan, start: int, end: int, name: str, chain: list[int]) -> bool:
    """No step strictly between ``start`` and ``end``, outside the chain, reads or writes
    ``name`` (the fused op writes it early, at ``start``)."""
    return all(name not in plan[p].bottoms and name not in plan[p].tops
               for p in range(start + 1, end) if p not in chain)


def plain_layer(module: "NetModule", step: Step) -> Layer | None:
    """The step's layer when the step still runs that layer unchanged, else None."""
    layer = module.layers[step.index] if step.index >= 0 else None
    return layer if layer is not None and step.fn is layer else None


def fuse_normalize_affine(plan: list[Step], module: "NetModule") -> list[Step]:
    readers = plan_readers(plan, module.kept_blobs())
    steps: list[Step] = []
    absorbed: set[int] = set()
    for pos, step in enumerate(plan):
        if pos in absorbed:
            continue
        norm = plain_layer(module, step)
        channels = norm.absorbs_affine() if norm is not None else None
        nxt = _sole_reader(plan, readers, pos) if channels is not None else None
        after = plain_layer(module, plan[nxt]) if nxt is not None else None
        if after is not None and after.learned_affine(channels) is not None and \
                not any(plan[nxt].detach) and \
                name_free(plan, pos, nxt, plan[nxt].tops[0], []):
            absorbed.add(nxt)
            steps.append(replace(step, tops=plan[nxt].tops, fn=NormalizeAffine(norm, after),
                                 full_precision=False))
            continue
        steps.append(step)
    return steps


def alias_copies(plan: list[Step], module: "NetModule") -> list[Step]:
    out = []
    for step in plan:
        layer = plain_layer(module, step)
        if layer is not None and layer.is_alias and len(step.bottoms) == 1:
            step = replace(step, fn=None, full_precision=False)
        out.append(step)
    return out


def _sole_reader(plan, readers, pos: int) -> int | None:
    """The one step reading ``pos``'s single top, if exactly one does (outputs count)."""
    step = plan[pos]
    if len(step.tops) != 1 or len(step.bottoms) != 1:
        return None
    who = readers[(pos, step.tops[0])]
    return who[0] if len(who) == 1 and who[0] >= 0 else None


def _fresh_unsaved(module: "NetModule", step: Step) -> bool:
    """``step`` makes a new tensor for its single top that its backward does not keep."""
    if len(step.tops) != 1:
        return False
    if isinstance(step.fn, NormalizeAffine):
        return True
    layer = plain_layer(module, step)
    return layer is not None and layer.output_not_saved(len(step.bottoms))


def rectify_in_place(plan: list[Step], module: "NetModule") -> list[Step]:
    """Turn each rectifier that reads a fresh, unsaved tensor into an in-place one.

    Being its only reader needs no count: Caffe's Split insertion turns every fan-out (a
    second reader, or a loss_weight on the blob) into a Split, and a Split's alias is not
    a fresh tensor; a net output has no reader at all."""
    steps = list(plan)
    writer: dict[str, int] = {}
    for pos, step in enumerate(steps):
        layer = plain_layer(module, step)
        slope = layer.rectifier_slope() if layer is not None else None
        if slope is not None and slope >= 0 and len(step.bottoms) == 1 and not step.detach[0]:
            source = writer.get(step.bottoms[0])
            if source is not None and _fresh_unsaved(module, steps[source]):
                steps[pos] = replace(step, fn=InPlaceReLU(layer))
        for t in step.tops:
            writer[t] = pos
    return steps


TRAINING_PIPELINE = (fuse_normalize_affine, alias_copies, rectify_in_place)


def lean_plan(module: "NetModule", passes=TRAINING_PIPELINE) -> list[Step]:
    """``module``'s plan rewritten by the training pipeline, with its own releases."""
    plan = [replace(step) for step in module.plan()]      # copies: releases are per plan
    for rewrite in passes:
        plan = rewrite(plan, module)
    mark_releases(plan, module.kept_blobs())
    return plan
