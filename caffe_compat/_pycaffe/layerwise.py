"""Layer-by-layer forward and backward for pycaffe's ``Net`` (Caffe's ForwardFromTo and
BackwardFromTo).

Each layer reads its bottoms from the blobs (the tensors this call produced, or the host
arrays for blobs produced outside the range), so ``forward(start=...)`` and hand-written
blob data work as in Caffe. Each layer's bottoms enter as fresh autograd leaves and its
graph is kept (``LayerTrace``), so ``backward`` runs one layer at a time from the top
blobs' *diffs*: diffs set by hand on any top are used, ``start``/``end`` bound the range,
bottom diffs are overwritten and parameter diffs accumulate, as in Caffe. A layer with no
recorded forward (backward before any forward) is re-run from the blobs' current data.

On a GPU, results stay on the device (pending in the Net's ``BlobState``) until Python
reads them, and a
layer reading a blob takes that device tensor: a forward copies nothing to the host that
nobody looks at (Caffe's SyncedMemory). On the CPU every result is copied into the blob's
stable host array at once, so arrays fetched earlier always show the latest values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerTrace:
    """One layer's last forward: its bottom leaves (None where no diff is needed) and tops."""
    leaves: list
    tops: list


@dataclass
class BackwardPlan:
    """Caffe's layer_need_backward_ and bottom_need_backward_ (Net::Init)."""
    layer: list[bool]
    bottom: list[list[bool]]


def _cut_bottoms(layer, n: int) -> list[bool]:
    """Bottoms that never get a diff: labels (no AllowForceBackward) or propagate_down false."""
    pd = list(layer.param.propagate_down)
    return [(j in layer.no_grad_bottoms) or (bool(pd) and not pd[j]) for j in range(n)]


def backward_plan(module) -> BackwardPlan:
    """Which layers run backward and which bottoms get diffs, by Caffe's rules.

    Forward pass: a blob needs backward when its producer has a learnable param or a bottom
    that needs it. Backward pass: layers that do not contribute to a loss, or whose tops no
    consumer propagates into, are skipped. ``force_backward`` turns every layer on.
    """
    names = list(module.layer_names)
    layers = list(module.layers)
    blob_need: dict[str, bool] = {}
    layer_need, bottom_need, cuts = [], [], []
    for index, (name, layer) in enumerate(zip(names, layers)):
        bottoms = module.layer_bottoms(index)
        cut = _cut_bottoms(layer, len(bottoms))
        need_b = [blob_need.get(b, False) and not c for b, c in zip(bottoms, cut)]
        need = any(blob_need.get(b, False) for b in bottoms) or \
            any(p.requires_grad for p in layer.blobs)
        for t in module.layer_tops(index):
            blob_need[t] = need
        layer_need.append(need)
        bottom_need.append(need_b)
        cuts.append(cut)
    under_loss: set[str] = set()
    skip: set[str] = set()
    for i in range(len(names) - 1, -1, -1):
        tops = module.layer_tops(i)
        contributes = any(t in module.loss_weights or t in under_loss for t in tops)
        skip_down = all(t in skip for t in tops)
        if layer_need[i] and skip_down and tops:
            layer_need[i] = False
            bottom_need[i] = [False] * len(bottom_need[i])
        if not contributes:
            layer_need[i] = False
        for j, b in enumerate(module.layer_bottoms(i)):
            if contributes:
                under_loss.add(b)
            else:
                bottom_need[i][j] = False
            if not bottom_need[i][j]:
                skip.add(b)
    if module.net_param.force_backward:
        layer_need = [True] * len(names)
        bottom_need = [[not c for c in cut] for cut in cuts]
    return BackwardPlan(layer_need, bottom_need)


def _lazy(net, device: torch.device) -> bool:
    """Keep results on the device until read (GPU; ``BlobState.lazy`` forces it for tests)."""
    return net.blob_state.lazy or device.type != "cpu"


def _bottom_leaves(net, pos: int, made: dict, device) -> tuple[dict, list]:
    m = net.module
    bottoms = m.layer_bottoms(pos)
    needs = net.backward_needs.bottom[pos]
    local: dict[str, torch.Tensor] = {}
    leaves: list = []
    for b, need in zip(bottoms, needs):
        if b not in local:
            src = made[b] if b in made else net.blob_state.tensor(b, "data", device)
            local[b] = src.detach()
        if need:
            local[b].requires_grad_(True)
        leaves.append(local[b] if need else None)
    return local, leaves


def run_layer(net, pos: int, made: dict, device, store: bool) -> LayerTrace:
    """Forward one layer; with ``store`` its tops go to the blobs and to ``made``."""
    m = net.module
    name = m.layer_names[pos]
    layer = m.layers[pos]
    tops = m.layer_tops(pos)
    if layer.feeds_input:   # Caffe's Input layer computes nothing: the blobs are the input
        values = [net.blob_state.tensor(t, "data", device) for t in tops]
        made.update(zip(tops, values))
        return LayerTrace([], values)
    local, leaves = _bottom_leaves(net, pos, made, device)
    with torch.set_grad_enabled(net.backward_needs.layer[pos] and torch.is_grad_enabled()):
        out = m.run({}, pos, pos, blobs=local)
    values = [out[t] for t in tops]
    keep = [not again for again in getattr(layer, "refill", ())]
    for j, kept in enumerate(keep):       # constant DummyData tops keep what the blob holds
        if kept:
            values[j] = net.blob_state.tensor(tops[j], "data", device)
    if store:
        lazy = _lazy(net, device)
        for t, v in zip(tops, values):
            net.blob_state.put(t, v, lazy=lazy)
            made[t] = v
    return LayerTrace(leaves, values)


def _announce(net, when: str, pos: int) -> None:
    for fn in net.layer_callbacks(when):
        fn(pos)


def forward_range(net, start: int, end: int, device, callbacks: bool = True) -> None:
    """Forward layers ``start``..``end``; ``callbacks`` False: the user's layer callbacks do
    not run (a recompute of blobs a fast forward skipped is no forward of the caller's)."""
    made: dict[str, torch.Tensor] = {}
    for pos in range(start, end + 1):
        if callbacks:
            _announce(net, "before_forward", pos)
        net.blob_state.record(pos, run_layer(net, pos, made, device, store=True))
        if callbacks:
            _announce(net, "after_forward", pos)


def backward_range(net, start: int, end: int, device) -> None:
    """Run layers ``start`` down to ``end`` backward from the tops' current diffs."""
    m = net.module
    for pos in range(start, end - 1, -1):
        _announce(net, "before_backward", pos)
        _backward_layer(net, pos, device)
        _announce(net, "after_backward", pos)


def _backward_layer(net, pos: int, device) -> None:
    m = net.module
    if not net.backward_needs.layer[pos]:
        return
    name = m.layer_names[pos]
    bottoms, tops = m.layer_bottoms(pos), m.layer_tops(pos)
    if not bottoms and not m.layers[pos].blobs:
        return                        # a source layer: nothing to compute
    trace = net.blob_state.trace(pos)
    if trace is None:
        trace = run_layer(net, pos, {}, device, store=False)
        net.blob_state.record(pos, trace)
    outs, grads = [], []
    for t, value in zip(tops, trace.tops):
        if value.requires_grad:
            outs.append(value)
            grads.append(net.blob_state.tensor(t, "diff", device).reshape(value.shape))
    if outs:
        torch.autograd.backward(outs, grads, retain_graph=True)
    diffs = [None if leaf is None else leaf.grad for leaf in trace.leaves]
    for leaf in trace.leaves:
        if leaf is not None:
            leaf.grad = None
    lazy = _lazy(net, device)
    for j, (b, g) in enumerate(zip(bottoms, diffs)):
        if net.backward_needs.bottom[pos][j]:
            if g is None:
                g = torch.zeros(net.blobs[b].shape, device=device)
            net.blob_state.put(b, g, "diff", lazy=lazy)
