"""Shape and routing layers: Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop, Tile,
Softmax, ArgMax, Silence, Reduction.

None of these has parameters. Layers with a variable number of tops return one tensor when
there is one top and a tuple otherwise; tops that alias the bottom in Caffe (Split, a single
Concat/Slice, Flatten, Reshape) are views here, each its own autograd node, so the builder
can keep every top's gradient apart.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, register
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.layers import fast_forms


def canonical_axis(layer: Layer, axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex: negative axes count from the end; out of range is an error."""
    if not -ndim <= axis < ndim:
        raise layer.error(f"{what} {axis} is out of range for a {ndim}-D bottom "
                          f"(valid: {-ndim} to {ndim - 1})")
    return axis + ndim if axis < 0 else axis


def pack(tops: Sequence[torch.Tensor]):
    """The layer contract's return value: one tensor for one top, else a tuple."""
    return tops[0] if len(tops) == 1 else tuple(tops)


def _num_tops(param) -> int:
    return max(1, len(param.top))


# ---------------------------------------------------------------------------- Eltwise


class _EltwiseMax(torch.autograd.Function):
    """Element-wise max with Caffe's tie rule and a gradient to the winning bottom only.

    Bottom 1 beats bottom 0 unless bottom 0 is strictly greater; each later bottom wins only
    where it is strictly greater than the running max. ``torch.maximum`` splits ties' gradient
    in half instead, so it cannot be used.
    """

    @staticmethod
    def forward(ctx, *bottoms: torch.Tensor) -> torch.Tensor:
        take0 = bottoms[0] > bottoms[1]
        top = torch.where(take0, bottoms[0], bottoms[1])
        winner = (~take0).to(torch.int32)  # index of the bottom holding the max, like Caffe's mask
        for i in range(2, len(bottoms)):
            take = bottoms[i] > top
            top = torch.where(take, bottoms[i], top)
            winner = torch.where(take, i, winner).to(torch.int32)
        ctx.save_for_backward(winner)
        return top

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (winner,) = ctx.saved_tensors
        return tuple(torch.where(winner == i, grad, 0.0) if need else None
                     for i, need in enumerate(ctx.needs_input_grad))


class _EltwiseProdByDivision(torch.autograd.Function):
    """PROD with ``stable_prod_grad: false``: Caffe's gradient is ``dy * top / bottom_i``
    (inf/nan where a bottom is 0), not autograd's product of the other bottoms."""

    @staticmethod
    def forward(ctx, *bottoms: torch.Tensor) -> torch.Tensor:
        top = bottoms[0]
        for b in bottoms[1:]:
            top = top * b
        ctx.save_for_backward(top, *bottoms)
        return top

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        top, *bottoms = ctx.saved_tensors
        return tuple(top / b * grad if need else None
                     for b, need in zip(bottoms, ctx.needs_input_grad))


@register
class Eltwise(Layer):
    """Element-wise SUM (with one coeff per bottom), PROD or MAX over same-shaped bottoms."""

    type = "Eltwise"
    num_bottoms = (2, None)
    num_tops = (1, 1)
    keeps_coords = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.eltwise_param
        P = caffe_pb2.EltwiseParameter
        self.operation = p.operation
        n = len(bottom_shapes)
        if p.coeff and len(p.coeff) != n:
            raise self.error(f"takes one coeff per bottom: got {len(p.coeff)} coeffs "
                             f"for {n} bottoms")
        # Caffe refuses coefficients only for PROD; MAX accepts them and never reads them.
        if p.coeff and self.operation == P.PROD:
            raise self.error("coeff is only allowed with operation: SUM (operation is PROD)")
        self.coeff = [float(c) for c in p.coeff] or [1.0] * n
        self.stable_prod_grad = bool(p.stable_prod_grad)
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        first = tuple(bottom_shapes[0])
        for i, s in enumerate(bottom_shapes[1:], 1):
            if tuple(s) != first:
                raise self.error(f"all bottoms must have the same shape: bottom 0 is "
                                 f"{list(first)}, bottom {i} is {list(s)}")
        return [first]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        P = caffe_pb2.EltwiseParameter
        self.top_shapes([tuple(b.shape) for b in bottoms])  # torch would broadcast silently
        if self.operation == P.SUM:
            top = bottoms[0] * self.coeff[0] if self.coeff[0] != 1.0 else bottoms[0]
            for b, c in zip(bottoms[1:], self.coeff[1:]):
                top = top + (b * c if c != 1.0 else b)
            return top
        if self.operation == P.MAX:
            return _EltwiseMax.apply(*bottoms)
        if not self.stable_prod_grad:
            return _EltwiseProdByDivision.apply(*bottoms)
        # Stable gradient = product of the other bottoms, which is exactly autograd's.
        top = bottoms[0]
        for b in bottoms[1:]:
            top = top * b
        return top

    def output_not_saved(self, num_bottoms: int) -> bool:
        return self.operation == caffe_pb2.EltwiseParameter.SUM and num_bottoms >= 2

    def fresh_output(self, num_bottoms: int) -> bool:
        return num_bottoms >= 2

    def sums_bottoms(self) -> bool:
        return self.operation == caffe_pb2.EltwiseParameter.SUM and set(self.coeff) == {1.0}


# ------------------------------------------------------------------- Concat / Slice / Split


def _legacy_axis(layer: Layer, p, legacy: str, ndim: int) -> int:
    """Axis from ``axis`` or the old unsigned ``concat_dim``/``slice_dim`` (which wins if set)."""
    if p.HasField(legacy) and p.HasField("axis"):
        raise layer.error(f"give either axis or {legacy}, not both")
    if p.HasField(legacy):
        value = getattr(p, legacy)
        if value >= ndim:
            raise layer.error(f"{legacy} ({value}) is out of range for a {ndim}-D bottom")
        return value
    return canonical_axis(layer, p.axis, ndim)


@register
class Concat(Layer):
    """Join bottoms along ``axis``; all other dims must match."""

    type = "Concat"
    num_bottoms = (1, None)
    num_tops = (1, 1)
    keeps_coords = True      # for bottom 0 on any axis: it comes first

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.top_shapes(bottom_shapes)

    def _axis(self, ndim: int) -> int:
        return _legacy_axis(self, self.param.concat_param, "concat_dim", ndim)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        first = list(bottom_shapes[0])
        axis = self._axis(len(first))
        top = list(first)
        for i, s in enumerate(bottom_shapes[1:], 1):
            s = list(s)
            others_differ = any(a != b for j, (a, b) in enumerate(zip(s, first)) if j != axis)
            if len(s) != len(first) or others_differ:
                raise self.error(f"all bottoms must have the same shape except on axis {axis}: "
                                 f"bottom 0 is {first}, bottom {i} is {s}")
            top[axis] += s[axis]
        return [tuple(top)]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        if len(bottoms) == 1:
            return bottoms[0].view_as(bottoms[0])
        return torch.cat(bottoms, dim=self._axis(bottoms[0].dim()))

    def fresh_output(self, num_bottoms: int) -> bool:
        return num_bottoms >= 2              # one bottom: a view of it


@register
class Slice(Layer):
    """Cut the bottom along ``axis`` at ``slice_point``s, or into equal parts (one per top)."""

    type = "Slice"
    num_bottoms = (1, 1)
    num_tops = (1, None)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.num_outputs = _num_tops(param)
        points = list(param.slice_param.slice_point)
        if points:
            if len(points) != self.num_outputs - 1:
                raise self.error(f"needs one slice_point fewer than tops: {len(points)} "
                                 f"slice_points for {self.num_outputs} tops")
            if any(b <= a for a, b in zip([0] + points, points)):
                raise self.error("slice_points must be positive and strictly increasing, "
                                 f"got {points}")
        self.slice_points = points
        self.top_shapes(bottom_shapes)

    def _sizes(self, shape: Shape) -> tuple[int, list[int]]:
        axis = _legacy_axis(self, self.param.slice_param, "slice_dim", len(shape))
        size = shape[axis]
        if self.slice_points:
            if self.slice_points[-1] >= size:
                raise self.error(f"slice_point {self.slice_points[-1]} must be smaller than the "
                                 f"size of axis {axis} ({size}) of bottom shape {list(shape)}")
            cuts = [0] + self.slice_points + [size]
            return axis, [b - a for a, b in zip(cuts, cuts[1:])]
        if size % self.num_outputs:
            raise self.error(f"the number of tops ({self.num_outputs}) must evenly divide the size "
                             f"of axis {axis} ({size}); or give slice_points")
        return axis, [size // self.num_outputs] * self.num_outputs

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        axis, sizes = self._sizes(shape)
        return [shape[:axis] + (n,) + shape[axis + 1:] for n in sizes]

    def forward(self, x: torch.Tensor):
        axis, sizes = self._sizes(tuple(x.shape))
        if len(sizes) == 1:
            return x.view_as(x)
        return tuple(torch.split(x, sizes, dim=axis))


@register
class Split(Layer):
    """One bottom copied to N tops (Caffe inserts these for fan-out); backward sums the diffs."""

    type = "Split"
    num_bottoms = (1, 1)
    num_tops = (1, None)
    is_alias = True
    keeps_coords = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.num_outputs = _num_tops(param)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return [tuple(bottom_shapes[0])] * self.num_outputs

    def forward(self, x: torch.Tensor):
        # Distinct view nodes, so each top's gradient can be retained separately.
        return pack([x.view_as(x) for _ in range(self.num_outputs)])


# ---------------------------------------------------------------------------- Flatten / Reshape


@register
class Flatten(Layer):
    """Merge axes ``[axis, end_axis]`` into one: ``shape[:axis] + [prod] + shape[end_axis+1:]``."""

    type = "Flatten"
    specialized = fast_forms.reshape      # a batch-1 forward without per-call work
    num_bottoms = (1, 1)
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        if param.top and param.bottom and param.top[0] == param.bottom[0]:
            raise self.error("cannot run in place: give the top a name other than its bottom "
                             f"('{param.bottom[0]}')")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        p = self.param.flatten_param
        start = canonical_axis(self, p.axis, len(shape))
        end = canonical_axis(self, p.end_axis, len(shape), "end_axis")
        if end < start:
            raise self.error(f"end_axis ({p.end_axis}) must not come before axis ({p.axis}) "
                             f"for bottom shape {list(shape)}")
        return [shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.top_shapes([tuple(x.shape)])[0])


@register
class Reshape(Layer):
    """Replace axes ``[axis, axis + num_axes)`` by ``shape``; a 0 copies the bottom dim at that
    position and one -1 is inferred from the element count."""

    type = "Reshape"
    specialized = fast_forms.reshape      # a batch-1 forward without per-call work
    num_bottoms = (1, 1)
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        if self.dims.count(-1) > 1:
            raise self.error(f"shape {self.dims} has more than one -1; at most one dim can be "
                             "inferred")
        if any(d < -1 for d in self.dims):
            raise self.error(f"shape {self.dims} has a dim below -1; use 0 to copy, -1 to infer")
        if p.num_axes < -1:
            raise self.error(f"num_axes ({p.num_axes}) must be >= 0, or -1 for all remaining axes")
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(bottom_shapes[0])
        ndim = len(shape)
        p = self.param.reshape_param
        # A negative axis counts from past the end: -1 means "append after the last axis".
        start = p.axis if p.axis >= 0 else ndim + p.axis + 1
        if not 0 <= start <= ndim:
            raise self.error(f"axis ({p.axis}) is out of range for a {ndim}-D bottom")
        end = ndim if p.num_axes == -1 else start + p.num_axes
        if end > ndim:
            raise self.error(f"axis ({p.axis}) + num_axes ({p.num_axes}) exceeds the {ndim} axes "
                             f"of bottom shape {list(shape)}")
        new = list(self.dims)
        for i, d in enumerate(new):
            if d == 0:
                if start + i >= ndim:
                    raise self.error(f"shape dim {i} is 0 (copy) but bottom shape {list(shape)} "
                                     f"has no axis {start + i} to copy")
                new[i] = shape[start + i]
        count = math.prod(shape)
        if -1 in new:
            known = (math.prod(shape[:start]) * math.prod(shape[end:])
                     * math.prod(d for d in new if d != -1))
            if known == 0 or count % known:
                raise self.error(f"bottom count ({count}) of shape {list(shape)} is not divisible "
                                 f"by the product of the given dims ({known})")
            new[new.index(-1)] = count // known
        top = shape[:start] + tuple(new) + shape[end:]
        if math.prod(top) != count:
            raise self.error(f"output shape {list(top)} has {math.prod(top)} elements but bottom "
                             f"shape {list(shape)} has {count}")
        return [top]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.top_shapes([tuple(x.shape)])[0])


# ---------------------------------------------------------------------------- Crop / Tile


@register
class Crop(Layer):
    """Crop bottom 0 to bottom 1's size on every axis >= ``axis``, starting at ``offset``.

    Bottom 1 only gives the shape; it gets no gradient.
    """

    type = "Crop"
    num_bottoms = (2, 2)
    num_tops = (1, 1)
    no_grad_bottoms = (1,)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.top_shapes(bottom_shapes)
        self.ndim = len(bottom_shapes[0])
        # BVLC's offset is 0 here; the FCN-future fork's parameterless Crop computed one.
        self.infers_crop = not param.HasField("crop_param")

    def coord_map(self):
        """Top pixel i is bottom 0's pixel i + offset, on every axis from ``axis`` on."""
        start = canonical_axis(self, self.param.crop_param.axis, self.ndim)
        return start - 1, 1, -np.asarray(self._given(self.ndim)[start:], dtype=np.float64)

    def _given(self, ndim: int) -> list[int]:
        """Start index of the crop on every axis (0 on the uncropped ones)."""
        p = self.param.crop_param
        start = canonical_axis(self, p.axis, ndim)
        given = list(p.offset)
        if len(given) > 1 and len(given) != ndim - start:
            raise self.error(f"give one offset, or one per cropped axis ({ndim - start} axes "
                             f"from axis {start}); got {len(given)}")
        return [0 if i < start else given[0] if len(given) == 1 else
                given[i - start] if given else 0 for i in range(ndim)]

    def _offsets(self, shape: Shape, ref: Shape) -> list[int]:
        """``_given``, checked against these bottom shapes."""
        if len(shape) != len(ref):
            raise self.error(f"bottom 0 {list(shape)} and bottom 1 {list(ref)} must have the same "
                             "number of axes")
        offsets = self._given(len(shape))
        start = canonical_axis(self, self.param.crop_param.axis, len(shape))
        for i in range(start, len(shape)):
            if shape[i] - offsets[i] < ref[i]:
                raise self.error(f"cannot crop axis {i}: bottom 0 size {shape[i]} minus offset "
                                 f"{offsets[i]} is smaller than bottom 1 size {ref[i]}")
        return offsets

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        shape, ref = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        start = canonical_axis(self, self.param.crop_param.axis, len(shape))
        self._offsets(shape, ref)
        return [shape[:start] + ref[start:]]

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        offsets = self._offsets(tuple(x.shape), tuple(ref.shape))
        start = canonical_axis(self, self.param.crop_param.axis, x.dim())
        index = tuple(slice(None) if i < start else slice(o, o + ref.shape[i])
                      for i, o in enumerate(offsets))
        return x[index]
