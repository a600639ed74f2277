"""The layer contract and the registry that maps Caffe type strings to layer classes.

A layer is a ``torch.nn.Module`` built from one ``LayerParameter``. Its ``forward``
takes the bottom tensors in prototxt order and returns the top tensors (a tuple, or
one tensor when there is one top). Backward is autograd; a layer whose Caffe gradient
differs from autograd's (ties, clipping) uses a ``torch.autograd.Function``.

Learnable/stateful blobs live in ``self.blobs`` (an ``nn.ParameterList``) in Caffe's
blob order, so ``net.params[name][i]`` and caffemodel blob ``i`` line up. The net
builder may replace ``self.blobs[i]`` by a parameter shared with another layer
(``param { name: ... }``), so ``forward`` must read ``self.blobs[i]`` every call and
never keep its own reference.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch

from caffe_compat.formats.coords import IDENTITY
from caffe_compat.formats.errors import CaffeCompatError, with_context
from torch import nn

from caffe_compat.formats.forks import FORK_TYPES

# The autocast dtypes: what a ``full_precision`` layer is shielded from, and what BatchNorm
# keeps float32 statistics for.
REDUCED_DTYPES = (torch.bfloat16, torch.float16)

Shape = tuple[int, ...]

TRAIN, TEST = 0, 1


def legacy_shape(shape: Shape) -> tuple[int, int, int, int]:
    """Blob::LegacyShape view (num, channels, height, width): at most 4 axes, missing ones 1."""
    if len(shape) > 4:
        raise ValueError(f"a {len(shape)}-D blob has no legacy 4-D shape")
    return tuple(shape) + (1,) * (4 - len(shape))

_REGISTRY: dict[str, type["Layer"]] = {}
_BUILTINS_LOADED = False


def _registry() -> dict[str, type["Layer"]]:
    """The registry, with the built-in types loaded on first use (``builtin.MODULES``)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from caffe_compat.engine.layers import builtin
        builtin.load()
    return _REGISTRY


class LayerError(CaffeCompatError):
    """A problem with one layer's definition; the message names the layer."""


class BlobList(nn.ParameterList):
    """A layer's parameter blobs. Every change of *which* tensors a BlobList holds (an item
    set, appended or deleted, or replaced by ``module.to``/``_apply``) bumps the process-wide
    ``BlobList.changes``, so a per-forward check of a net's parameters lists them again only
    after one (engine/net/inference_cache.py): re-listing 150 parameters cost 20-70 us per
    call on a cold cache, 1-3% of an UltraFace forward. In-place writes to the tensors are
    torch's version counters' business, not this count's."""

    changes = 0

    def __setattr__(self, name, value) -> None:
        BlobList.changes += 1
        super().__setattr__(name, value)

    def __delattr__(self, name) -> None:
        BlobList.changes += 1
        super().__delattr__(name)

    def _apply(self, fn, recurse=True):
        # torch's _apply may put new Parameters into ``_parameters`` directly
        try:
            return super()._apply(fn, recurse)
        finally:
            BlobList.changes += 1


class Layer(nn.Module):
    """Base class of every Caffe layer.

    Class attributes a subclass sets:
        type: the exact Caffe type string ("Convolution").
        num_bottoms: (min, max) bottoms accepted; max None means unbounded.
        num_tops: (min, max) tops produced; max None means unbounded.
        is_loss: top 0 gets loss_weight 1 unless the prototxt says otherwise.
        auto_top: the net adds anonymous tops up to ``num_tops[0]`` when the prototxt
            names fewer (Caffe's AutoTopBlobs; true for every LossLayer).
        no_grad_bottoms: bottom indices that never receive a gradient (labels);
            Caffe's AllowForceBackward returns false for them.
        full_precision: under bf16/fp16 autocast the net runs this layer in float32 on
            float32 copies of its bottoms (losses, accuracies, softmax and batch
            statistics would lose digits or saturate in 8 mantissa bits).
        family: the group the README's layer table lists it under; "" means the name of
            the module that defines the class (``neuron`` for engine/layers/neuron.py).
        origin: where the type comes from: "BVLC" or the fork that defined it
            ("weiliu89/caffe (SSD)"); a user's plug-in may name itself.
        exports_to_onnx: an exporter can express the layer as graph ops (False for layers
            computing on the host or in user code: they run in torch after an exported
            prefix, engine/backends/split.py).
        traceable: a trace of ``forward`` (torch.jit.trace) replays it on other data of the
            same shapes. False for a layer computing on the host, branching on values or
            making a data-dependent number of rows: a trace would keep its example output as
            a constant (engine/net/frozen.py leaves it out of the frozen graph).
        is_alias: every top is its bottom unchanged (Split; Dropout at TEST): fused plans
            give the tops the bottom's tensor and run nothing. May be set per instance.
    """

    type: str = ""
    num_bottoms: tuple[int, int | None] = (1, 1)
    num_tops: tuple[int, int | None] = (1, 1)
    is_loss: bool = False
    auto_top: bool = False
    no_grad_bottoms: tuple[int, ...] = ()
    full_precision: bool = False
    family: str = ""
    origin: str = "BVLC"
    exports_to_onnx: bool = True
    traceable: bool = True
    is_alias: bool = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        """Build from ``param`` (a caffe_pb2.LayerParameter) for bottoms of these shapes.

        ``phase`` is TRAIN (0) or TEST (1), already resolved from the layer or net.
        Subclasses validate their parameters here and create their blobs with
        ``self.add_blob``; errors go through ``self.error`` so they name the layer.
        """
        super().__init__()
        self.param = param
        self.name = param.name
        self.phase = phase
        self.blobs = BlobList()

    # -- helpers for subclasses -------------------------------------------------
    def error(self, message: str) -> LayerError:
        return LayerError(with_context(message, f"layer '{self.name}' ({self.type})"))

    def add_blob(self, data: torch.Tensor, learnable: bool = True) -> nn.Parameter:
        """Append a parameter blob (float32). Non-learnable blobs (BatchNorm stats) get no grad."""
        p = nn.Parameter(data.to(torch.float32), requires_grad=learnable)
        self.blobs.append(p)
        return p

    # -- the contract -------------------------------------------------------------
    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        """Shapes of the tops for bottoms of these shapes (Caffe's Reshape).

        The default suits element-wise layers: one top shaped like bottom 0.
        """
        return [tuple(bottom_shapes[0])]

    def forward(self, *bottoms: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- capabilities: what the plan passes (engine/net/passes.py) may do with this layer ----
    # The passes ask these and nothing else; a plug-in layer that answers them joins the
    # lean training plan and the fused inference plan like a built-in one.
    feeds_input: bool = False     # its tops are the caller's inputs (Input): nothing computed
    is_source: bool = False       # makes its tops from outside the net (Input, data layers)
    runs_user_code: bool = False  # may read or write any blob (Python): no outputs-only path
    draws_random: bool = False    # each forward draws anew (Dropout sampling at TEST): every
    #                               blob must come from one draw, so no outputs-only path

    def output_not_saved(self, num_bottoms: int) -> bool:
        """The single top is a new tensor that this layer's backward does not keep (its
        weights or inputs suffice), so a following op may overwrite it in place."""
        return False

    def fresh_output(self, num_bottoms: int) -> bool:
        """The single top is always a new tensor, never a view of a bottom (no-grad runs
        may then overwrite it in place)."""
        return self.output_not_saved(num_bottoms)

    def affine(self, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a, s) in float64 with ``forward(x) == a * x + s`` per channel of axis 1 (for
        ``channels`` channels) at inference, or None: a linear layer before it may fold it."""
        return None

    def learned_affine(self, channels: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(gamma, beta or None): the live parameters of a learned per-channel affine map
        on axis 1, which a normalisation before it may apply itself while training."""
        return None

    def absorbs_affine(self) -> int | None:
        """Channels of axis 1 when ``forward_affine(x, gamma, beta)`` computes a following
        ``learned_affine`` layer's map in the same op as this one (BatchNorm), else None."""
        return None

    def forward_affine(self, x: torch.Tensor, gamma: torch.Tensor,
                       beta: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def linear_channels(self, top_shape: Shape) -> int | None:
        """Output channels (axis 1) when this layer is a linear map whose weights may carry a
        following per-channel affine map (``linear_with`` then runs it with other weights)."""
        return None

    def linear_with(self, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def flattened_linear(self) -> bool:
        """``linear_with(x, W, b) == F.linear(x.reshape(len(x), -1), W, b)`` (an InnerProduct on
        axis 1, untransposed): a plan may then reorder W's columns to read x's memory in
        another order (NHWC) without a copy."""
        return False

    def specialized(self, bottom_shapes: list[Shape]):
        """A faster equivalent of ``forward`` for these planned bottom shapes, built once when
        an inference plan is fused (forms in engine/layers/fast_forms.py), or None. It must
        hand any other input shape or dtype to ``forward``."""
        return None

    def winograd_geometry(self) -> dict | None:
        """For a 2-D convolution, its stride, padding, dilation and groups (``linear_with``
        may then be replaced by a Winograd transform where the kernel suits it)."""
        return None

    def weight_out_axis(self) -> int:
        """The axis of blob 0 indexed by output channel (for ``linear_channels`` layers)."""
        return 0

    def rectifier_slope(self) -> float | None:
        """``s`` when ``forward(x) == max(x, 0) + s * min(x, 0)`` element-wise (a ReLU), so it
        can run in place or be fused into the op before it; None otherwise."""
        return None

    def sums_bottoms(self) -> bool:
        """``forward`` is the plain sum of the bottoms, in order (may accumulate in place)."""
        return False

    # -- coordinate maps: where a top's pixels sit on bottom 0's (formats/coords.py) -------
    keeps_coords: bool = False   # top pixel (i, j) is computed at bottom 0's pixel (i, j)
    infers_crop: bool = False    # crops to bottom 1 with no offsets given (Crop without
    #                              crop_param): the FCN-future fork derived them from the
    #                              coordinate maps; engine/net/fork_crop.py reports them

    def coord_map(self):
        """(axis, scale, shift) taking bottom 0's spatial coordinates to the top's, as
        pycaffe's coord_map.py defines them; None where no such map exists (InnerProduct,
        Reshape). ``keeps_coords`` layers have the identity."""
        return IDENTITY if self.keeps_coords else None

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: register ``cls`` under ``cls.type``.

    This is also the plug-in API (README "Your own layers"): a user's own module defines a
    ``Layer`` subclass and decorates it. Registering a second class under a taken type is an
    error; re-running the same module (same module and class name) replaces the entry.
    """
    if not cls.type:
        raise TypeError(f"{cls.__name__} has no Caffe type string")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"{cls!r} is not a subclass of caffe_compat.engine.layers.Layer")
    old = _REGISTRY.get(cls.type)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                   cls.__qualname__):
        raise TypeError(f"layer type '{cls.type}' registered twice "
                        f"({_REGISTRY[cls.type].__name__} and {cls.__name__})")
    _REGISTRY[cls.type] = cls
    return cls


def layer_types() -> list[str]:
    """Every registered Caffe type string, sorted."""
    return sorted(_registry())


def layer_family(cls: type[Layer]) -> str:
    """``cls.family``, or its module's name: ``neuron`` for ``.../layers/neuron.py``,
    ``data`` for ``data/layers.py``, ``python`` for ``python_layer.py``."""
    if cls.family:
        return cls.family
    parts = cls.__module__.split(".")
    name = parts[-1]
    if name in ("layers", "layer") and len(parts) > 1:
        name = parts[-2]
    return name[:-len("_layer")] if name.endswith("_layer") else name


def unknown_type_message(type_name: str) -> str:
    """Why ``type_name`` is not available: close registered names, or the fork that has it."""
    message = f"Unknown layer type: {type_name}"
    fork = FORK_TYPES.get(type_name)
    if fork:
        message += f" (defined by {fork}, which this project does not implement)"
    else:
        message += " (no supported fork defines it)"
    close = difflib.get_close_matches(type_name, layer_types(), n=3, cutoff=0.6)
    lower = [t for t in layer_types() if t.lower() == type_name.lower() and t not in close]
    close = lower + close
    if close:
        message += f"; did you mean {' or '.join(close)}?"
    else:
        message += f"; known types: {', '.join(layer_types())}"
    return message


def layer_class(type_name: str) -> type[Layer]:
    try:
        return _registry()[type_name]
    except KeyError:
        raise LayerError(unknown_type_message(type_name)) from None
