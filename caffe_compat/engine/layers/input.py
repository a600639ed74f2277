"""Source layers with no bottoms: Input (fed by the caller) and DummyData (filler output)."""
from __future__ import annotations

from typing import Sequence

import torch

from caffe_compat.engine.fillers import fill
from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.engine.layers.common import pack


@register
class Input(Layer):
    """Declares the net's input blobs and their shapes; the net builder feeds their values.

    ``input_param.shape`` is given once (for every top), once per top, or not at all (the
    tops then have no shape until the caller sets one).
    """

    type = "Input"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    feeds_input = True
    is_source = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]
        n = max(1, len(param.top))
        if len(shapes) not in (0, 1, n):
            raise self.error(f"give 'shape' once, once per top or not at all: {n} tops but "
                             f"{len(shapes)} shapes")
        if not shapes:
            shapes = [()]
        self.shapes = [shapes[0 if len(shapes) == 1 else i] for i in range(n)]

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self, *bottoms: torch.Tensor):
        raise self.error("Input layers are not run: the net feeds their tops directly "
                         "(write the values into the net's input blobs instead)")


@register
class DummyData(Layer):
    """Tops filled by ``data_filler`` (one for all tops or one per top; default constant 0).

    Shapes come from ``shape`` (once or once per top) or the old ``num``/``channels``/
    ``height``/``width`` fields (each once or once per top). As in Caffe (``refill_``), a top
    with a constant filler is filled once at setup and then left alone (pycaffe users write
    labels into it); the others get fresh draws every forward. ``refill[i]`` says which.
    Draws use torch's RNG, so values match Caffe's in distribution, not bit for bit.
    """

    type = "DummyData"
    num_bottoms = (0, 0)
    num_tops = (1, None)
    is_source = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.dummy_data_param
        n = max(1, len(param.top))
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, n):
            raise self.error(f"give data_filler once, once per top or not at all: {n} tops but "
                             f"{len(fillers)} data_fillers")
        if not fillers:
            fillers = [None]  # Caffe's default: constant 0
        self.fillers = [fillers[0 if len(fillers) == 1 else i] for i in range(n)]
        self.shapes = self._shapes(p, n)
        # Tracks the module's device and dtype (``.to()``/``.double()``), as there are no bottoms.
        self.register_buffer("_like", torch.zeros(0), persistent=False)
        self.refill = tuple(f is not None and f.type != "constant" for f in self.fillers)
        self._once = [fill(f, s) for f, s in zip(self.fillers, self.shapes)]  # raises filler errors

    def _shapes(self, p, n: int) -> list[Shape]:
        legacy = ("num", "channels", "height", "width")
        if any(len(getattr(p, f)) for f in legacy):
            if len(p.shape):
                raise self.error("give either shape or the old num/channels/height/width, not both")
            for f in legacy:
                if len(getattr(p, f)) not in (1, n):
                    raise self.error(f"give '{f}' once or once per top ({n} tops); "
                                     f"got {len(getattr(p, f))}")
            pick = lambda f, i: getattr(p, f)[0 if len(getattr(p, f)) == 1 else i]  # noqa: E731
            return [tuple(int(pick(f, i)) for f in legacy) for i in range(n)]
        if len(p.shape) not in (1, n):
            raise self.error(f"give 'shape' once or once per top: {n} tops but "
                             f"{len(p.shape)} shapes")
        return [tuple(int(d) for d in p.shape[0 if len(p.shape) == 1 else i].dim) for i in range(n)]

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self):
        tops = [fill(f, s) if again else once
                for f, s, again, once in zip(self.fillers, self.shapes, self.refill, self._once)]
        return pack([t.to(self._like) for t in tops])
