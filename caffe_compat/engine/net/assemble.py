"""Pure NetParameter → NetParameter steps of net assembly: state filtering and Split insertion.

Both follow Caffe (net.cpp FilterNet/StateMeetsRule, insert_splits.cpp) so layer and blob
names, and therefore caffemodels and ``net.blobs``, are the ones Caffe would produce.
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

from caffe_compat.proto import caffe_pb2


class NetDefinitionError(CaffeCompatError):
    """A structural problem in a network definition; the message names the layer/blob."""


def make_state(phase: int, level: int = 0, stages=(), base: caffe_pb2.NetState | None = None
               ) -> caffe_pb2.NetState:
    """A NetState for ``phase`` merged over the net's own ``state`` (``base``), like the solver."""
    state = caffe_pb2.NetState()
    if base is not None:
        state.CopyFrom(base)
    state.phase = phase
    if level:
        state.level = level
    for s in stages:
        if s not in state.stage:
            state.stage.append(s)
    return state


def rule_matches(rule: caffe_pb2.NetStateRule, state: caffe_pb2.NetState) -> bool:
    """True when ``state`` satisfies every condition ``rule`` sets."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    if any(s in state.stage for s in rule.not_stage):
        return False
    return True


def filter_net(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState,
               source: str = "<net>") -> caffe_pb2.NetParameter:
    """Keep the layers whose include/exclude rules admit ``state``; resolve each layer's phase."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise NetDefinitionError(f"{source}: layer '{layer.name}' has both include and "
                                     "exclude rules; specify only one")
        if layer.include:
            keep = any(rule_matches(r, state) for r in layer.include)
        else:
            keep = not any(rule_matches(r, state) for r in layer.exclude)
        if keep:
            kept = out.layer.add()
            kept.CopyFrom(layer)
            if not kept.HasField("phase"):
                kept.phase = state.phase
    out.state.CopyFrom(state)
    return out


def _split_layer_name(blob: str, layer: str, top_idx: int) -> str:
    return f"{blob}_{layer}_{top_idx}_split"


def insert_splits(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Insert a Split layer after every top that feeds more than one consumer.

    A top with an explicit non-zero ``loss_weight`` counts as a consumer; its weight moves
    to split top 0 (Caffe's insert_splits.cpp). Names: ``<blob>_<layer>_<i>_split`` and
    tops ``<blob>_<layer>_<i>_split_<k>``.
    """
    producer: dict[str, tuple[int, int]] = {}   # blob -> (layer idx, top idx) of latest writer
    bottom_src: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: dict[tuple[int, int], int] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(net.layer):
        for j, name in enumerate(layer.bottom):
            if name not in producer:
                raise NetDefinitionError(f"{source}: Unknown bottom blob '{name}' (layer '{layer.name}', "
                                         f"bottom index {j})")
            src = producer[name]
            bottom_src[(i, j)] = src
            consumers[src] = consumers.get(src, 0) + 1
        for j, name in enumerate(layer.top):
            producer[name] = (i, j)
            if layer.loss_weight and j < len(layer.loss_weight) and layer.loss_weight[j]:
                loss_weight[(i, j)] = layer.loss_weight[j]
                consumers[(i, j)] = consumers.get((i, j), 0) + 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    next_split: dict[tuple[int, int], int] = {}
    for i, layer in enumerate(net.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j, name in enumerate(layer.bottom):
            src = bottom_src[(i, j)]
            if consumers[src] > 1:
                k = next_split.get(src, 0)
                next_split[src] = k + 1
                src_layer = net.layer[src[0]]
                new.bottom[j] = f"{_split_layer_name(name, src_layer.name, src[1])}_{k}"
        for j, name in enumerate(layer.top):
            count = consumers.get((i, j), 0)
            if count <= 1:
                continue
            split = caffe_pb2.LayerParameter(name=_split_layer_name(name, layer.name, j),
                                             type="Split", bottom=[name])
            split.top.extend(f"{split.name}_{k}" for k in range(count))
            if layer.HasField("phase"):
                split.phase = layer.phase
            weight = loss_weight.get((i, j), 0.0)
            if weight:
                split.loss_weight.extend([weight] + [0.0] * (count - 1))
                del new.loss_weight[:]
                next_split[(i, j)] = 1
            pending = out.layer.add()
            pending.CopyFrom(split)
    return out
