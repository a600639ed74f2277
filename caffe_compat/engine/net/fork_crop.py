"""The offsets a Crop without ``crop_param`` had on the FCN "future" branch of Caffe.

BVLC's Crop crops at offset 0 when no offset is given, and so does this project. The older
FCN branch (longjon/caffe "future", shipped by s9xie/hed for HED edge detection) had a Crop
with no parameters that derived its offsets when the net was set up: from each bottom it
followed first bottoms back to a common blob, composed the layers' coordinate maps, and
cropped by minus the resulting shift (scale 1, integer, not positive). HED's prototxts rely on
it (``conv1_1`` pads by 35, so the side outputs sit 30-odd pixels off the image), so they
build here and give misaligned outputs. The builder keeps BVLC's result (what BVLC Caffe
computes) and names, once per such layer, the ``crop_param`` that reproduces the fork.
"""
from __future__ import annotations

import logging

import numpy as np

from caffe_compat.formats.coords import IDENTITY, AxisMismatchException, compose, inverse

log = logging.getLogger(__name__)
_WARNED: set[tuple] = set()


def warn_inferred_crops(net) -> None:
    """Log one warning per ``infers_crop`` layer of ``net`` (a NetModule being built) whose
    fork offsets are well defined and not all zero."""
    if not any(layer.infers_crop for layer in net.layers):
        return                                # the usual net: no walk over its plan
    plan = net.plan()
    producer: dict[str, int] = {}
    for position, step in enumerate(plan):
        for top in step.tops:
            producer.setdefault(top, position)    # the first writer: in-place layers skipped
    # A parameterless Crop met on a later walk contributes the fork's offsets, not ours.
    fork_maps: dict[int, tuple] = {}
    for position, step in enumerate(plan):
        layer = net.layers[step.index]
        if not layer.infers_crop:
            continue
        found = _fork_offsets(net, plan, producer, fork_maps, step)
        if found is None or not any(found[1]):
            continue
        axis, offsets = found
        fork_maps[position] = (axis - 1, 1, -np.asarray(offsets, dtype=np.float64))
        said = (net.source, step.name, tuple(step.tops), axis, tuple(offsets))
        if said not in _WARNED:         # once per file and layer: a solver builds two nets
            _WARNED.add(said)
            log.warning(_message(net.source, step, layer.type, axis, offsets))


def _message(source: str, step, type_name: str, axis: int, offsets: list[int]) -> str:
    given = offsets[:1] if len(set(offsets)) == 1 else offsets
    line = "crop_param { axis: %d %s}" % (axis, "".join(f"offset: {o} " for o in given))
    axes = f"axis {axis}" if len(offsets) == 1 else f"axes {axis}-{axis + len(offsets) - 1}"
    derived = ", ".join(map(str, offsets))
    return (f"{source}: layer '{step.name}' ({type_name}, top '{step.tops[0]}') has no "
            "crop_param, so it crops at offset 0 as BVLC Caffe does; the FCN-future fork's "
            f"parameterless Crop (as s9xie/hed ships it) derived offsets {derived} on "
            f"{axes} from the coordinate maps. To align as that fork did, give the layer "
            f"{line}")


def _first_bottom_chain(plan, producer, blob: str) -> list[str]:
    """``blob``, then the first bottom of its producer, and so on back to a source."""
    chain = [blob]
    while blob in producer and plan[producer[blob]].bottoms:
        blob = plan[producer[blob]].bottoms[0]
        if blob in chain:
            break
        chain.append(blob)
    return chain


def _map_back(net, plan, producer, fork_maps, chain: list[str], common: str):
    """The map from ``common`` to ``chain[0]`` through the producers on the chain, or None
    where one of them declares no map."""
    total = IDENTITY
    for blob in chain[:chain.index(common)]:
        position = producer[blob]
        step_map = fork_maps.get(position) or net.layers[plan[position].index].coord_map()
        if step_map is None:
            return None
        total = compose(total, step_map)
    return total


def _fork_offsets(net, plan, producer, fork_maps, step):
    """(first cropped axis, offsets) the fork would crop bottom 0 at, or None when it would
    fail: no common blob, a layer without a map, a scale change, a fractional or positive
    shift, or a crop that runs past bottom 0."""
    chains = [_first_bottom_chain(plan, producer, b) for b in step.bottoms]
    common = next((b for b in chains[1] if b in chains[0]), None)
    if common is None:
        return None
    maps = [_map_back(net, plan, producer, fork_maps, c, common) for c in chains]
    if None in maps:
        return None
    try:
        axis, scale, shift = compose(maps[1], inverse(maps[0]))
    except AxisMismatchException:
        return None
    if axis is None:
        return None                   # point-wise all the way: nothing moved, offsets 0
    shape, ref = (net.blob_shapes[b] for b in step.bottoms)
    count = len(shape) - axis - 1
    try:
        scale, shift = (np.broadcast_to(np.asarray(v, dtype=np.float64), (count,))
                        for v in (scale, shift))
    except ValueError:                # maps of another number of spatial axes
        return None
    if not (np.allclose(scale, 1) and np.all(shift <= 1e-6)
            and np.allclose(shift, np.round(shift), atol=1e-6)):
        return None
    offsets = [int(o) for o in -np.round(shift)]
    if any(shape[axis + 1 + i] - o < ref[axis + 1 + i] for i, o in enumerate(offsets)):
        return None
    return axis + 1, offsets
