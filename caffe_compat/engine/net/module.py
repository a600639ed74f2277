"""NetModule: a Caffe NetParameter instantiated as a plain ``torch.nn.Module``.

Building is a short chain of pure steps (upgrade → filter by NetState → insert Splits →
instantiate layers and wire blobs). ``forward(**inputs)`` returns the output blobs as a
dict of tensors; ``run`` exposes every blob for the pycaffe wrapper; ``loss`` sums the
weighted loss tops (Caffe: Σ w·sum(top)). Backward is autograd. Runs that keep no
intermediate blob (``forward``, the solver's step) follow a lean plan of the same layers
(BatchNorm + Scale fused, in-place ReLUs: engine/net/train_fuse.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from caffe_compat.engine.layers.base import Layer, LayerError, Shape, layer_class
from caffe_compat.engine.net.assemble import (NetDefinitionError, filter_net, insert_splits,
                                       make_state)
from caffe_compat.engine.net.fork_crop import warn_inferred_crops
from caffe_compat.engine.net.plan import Step, execute, mark_releases
from caffe_compat.engine.net.train_fuse import lean_plan
from caffe_compat.engine.net.upgrade import upgrade_net
from caffe_compat.proto import caffe_pb2
from caffe_compat.engine.layers.python_trust import allow_python_layers as python_layers_policy
from caffe_compat.formats.budget import check_shape
from caffe_compat.formats.errors import ResourceError, first_line, with_context

AUTO_TOP = "(automatic)"   # Caffe's name for a top the prototxt leaves out (AppendTop)

@dataclass
class LearnableParam:
    """One learnable blob as the solver sees it (Caffe's learnable_params_ entry)."""
    name: str            # "<owner layer>/<blob index>"
    tensor: nn.Parameter
    lr_mult: float
    decay_mult: float


def _line_of(source: str, layer_name: str) -> str:
    """":<line>" of the layer's ``name:`` in the prototxt file ``source``, or "" if unknown."""
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return ""
    # either quote: FCN's, HED's and py-faster-rcnn's prototxts write name: 'conv1'
    match = re.search(r'\bname\s*:\s*(["\'])' + re.escape(layer_name) + r'\1', text)
    return f":{text.count(chr(10), 0, match.start()) + 1}" if match else ""


class NetModule(nn.Module):
    """A Caffe net as a torch module. Build with ``NetModule.from_param`` or ``build_net``."""

    def __init__(self, net_param: caffe_pb2.NetParameter, phase: int, source: str = "<net>"):
        super().__init__()
        self.name = net_param.name
        self.phase = phase
        self.source = source
        self.net_param = net_param            # filtered, split-inserted definition
        self.layers = nn.ModuleList()
        self.layer_names: list[str] = []
        self.blob_shapes: dict[str, Shape] = {}
        self.input_names: list[str] = []      # tops of Input layers, fed through forward()
        self.loss_weights: dict[str, float] = {}
        self.learnable_params: list[LearnableParam] = []
        self.bottom_names: dict[str, list[str]] = {}
        self.top_names: dict[str, list[str]] = {}
        self._plan: list[Step] = []         # layer by layer (engine/net/plan.py)
        self._anonymous: set[str] = set()     # AutoTopBlobs tops: not outputs, not readable
        try:
            self._build(net_param)
        except BaseException:
            self.close()                # a refused net leaves no data thread reading a file
            raise

    def close(self) -> None:
        """Stop the data layers' prefetch threads and release their databases (a LevelDB
        admits one opener)."""
        for layer in self.layers:
            close = getattr(layer, "close", None)
            if callable(close):
                close()

    # -- construction -----------------------------------------------------------------
    def _build(self, net: caffe_pb2.NetParameter) -> None:
        produced_by: dict[str, str] = {}
        consumed: set[str] = set()
        available: dict[str, None] = {}    # produced, not yet consumed (ordered; O(1) removal)
        owners: dict[str, tuple[nn.Parameter, caffe_pb2.ParamSpec, str]] = {}
        force_backward = net.force_backward
        # Layer names may repeat, as in Caffe: both layers run, and a lookup by name
        # (net.params, top_names, layer_by_name) finds the later one.
        for index, lp in enumerate(net.layer):
            try:
                cls = layer_class(lp.type)
            except LayerError as exc:
                raise LayerError(f"{self.source}{_line_of(self.source, lp.name)}: layer "
                                 f"'{lp.name}': {exc}") from None
            tops = self._auto_tops(cls, lp)
            self._check_counts(cls, lp, tops)
            bottom_shapes = []
            for j, b in enumerate(lp.bottom):
                if b not in self.blob_shapes or b in self._anonymous:
                    raise NetDefinitionError(f"{self.source}: Unknown bottom blob '{b}' (layer "
                                             f"'{lp.name}', bottom index {j})")
                bottom_shapes.append(self.blob_shapes[b])
                consumed.add(b)
                available.pop(b, None)
            for j, t in enumerate(tops):
                in_place = j < len(lp.bottom) and lp.bottom[j] == t
                if t in produced_by and not in_place:
                    raise NetDefinitionError(
                        f"{self.source}: top blob '{t}' of layer '{lp.name}' is already produced "
                        f"by layer '{produced_by[t]}'; give it a new name (only in-place "
                        "layers, whose top equals their bottom, may reuse a blob)")
            try:
                layer: Layer = cls(lp, bottom_shapes, lp.phase)
                top_shapes = layer.top_shapes(bottom_shapes)
            except LayerError:
                raise
            except (ValueError, TypeError, IndexError, RuntimeError, OverflowError,
                    MemoryError) as exc:   # torch's messages run to many lines: keep the first
                if hasattr(exc, "caffe_python_layer"):
                    raise          # user code of a Python layer: unchanged, as pycaffe
                reason = first_line(exc)
                raise LayerError(with_context(reason, self.source,
                                              f"layer '{lp.name}' ({lp.type})")) from exc
            if len(top_shapes) != len(tops):
                raise LayerError(f"{self.source}: layer '{lp.name}' ({lp.type}) produces "
                                 f"{len(top_shapes)} tops but {len(tops)} are named")
            for t, shape in zip(tops, top_shapes):
                _check_top_size(self.source, lp, t, shape, cls.runs_user_code)
                produced_by[t] = lp.name
                self.blob_shapes[t] = tuple(int(d) for d in shape)
                if t not in self._anonymous:
                    available[t] = None
            if cls.feeds_input:
                self.input_names.extend(lp.top)
            self._set_loss_weights(layer, lp, tops)
            self._set_params(layer, lp, owners, force_backward)
            detach = self._detach_mask(layer, lp, force_backward)
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            self.bottom_names[lp.name] = list(lp.bottom)
            self.top_names[lp.name] = list(tops)
            self._plan.append(Step(index, tuple(lp.bottom), tuple(tops), detach, fn=layer,
                                   full_precision=layer.full_precision,
                                   feed=cls.feeds_input, name=lp.name))
        self.output_names = sorted(available)   # Caffe keeps them in a std::set
        warn_inferred_crops(self)
        mark_releases(self._plan, self.kept_blobs())
        # Built now, not on the first run: torch.compile traces that run (--compile).
        self._lean = lean_plan(self)

    def kept_blobs(self) -> set[str]:
        """Blobs a lean run never drops: the outputs and the loss tops."""
        return set(self.output_names) | set(self.loss_weights)

    def plan(self) -> list[Step]:
        """The layer-by-layer plan: one step per layer, every blob kept."""
        return self._plan

    def lean_plan(self) -> list[Step]:
        """The plan of full runs that keep no intermediate blob (the training pipeline,
        engine/net/train_fuse.py)."""
        return self._lean

    def _auto_tops(self, cls: type[Layer], lp: caffe_pb2.LayerParameter) -> list[str]:
        """The layer's tops, completed with anonymous ones where the class sets ``auto_top``.

        Caffe (net.cpp, AutoTopBlobs) gives such a layer (every LossLayer) unnamed tops up to
        its minimum count, all called ``(automatic)``: they hold the loss but are no net
        output and no later layer can read them. Blob names here must be unique, so a second
        anonymous blob in the same net is ``(automatic)_1`` (in Caffe it would share the name).
        """
        tops = list(lp.top)
        if not cls.auto_top:
            return tops
        while len(tops) < cls.num_tops[0]:
            name = AUTO_TOP if AUTO_TOP not in self._anonymous else \
                f"{AUTO_TOP}_{len(self._anonymous)}"
            self._anonymous.add(name)
            tops.append(name)
        return tops

    def _check_counts(self, cls: type[Layer], lp: caffe_pb2.LayerParameter,
                      tops: Sequence[str]) -> None:
        for what, names, (lo, hi) in (("bottom", lp.bottom, cls.num_bottoms),
                                      ("top", tops, cls.num_tops)):
            n = len(names)
            if n < lo or (hi is not None and n > hi):
                want = f"{lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise LayerError(f"{self.source}: layer '{lp.name}' ({lp.type}) takes {want} "
                                 f"{what} blob(s), got {n}")

    def _set_loss_weights(self, layer: Layer, lp: caffe_pb2.LayerParameter,
                          tops: Sequence[str]) -> None:
        weights = list(lp.loss_weight)
        if weights and len(weights) != len(tops):
            raise LayerError(f"{self.source}: layer '{lp.name}' has {len(weights)} loss_weight "
                             f"values for {len(tops)} tops; give one per top")
        if not weights and layer.is_loss:
            weights = [1.0] + [0.0] * (len(tops) - 1)
            layer.param.loss_weight.extend(weights)   # saved in caffemodels, as Caffe does
        for top, w in zip(tops, weights):
            if w:
                self.loss_weights[top] = float(w)

    def _set_params(self, layer: Layer, lp: caffe_pb2.LayerParameter,
                    owners: dict[str, tuple[nn.Parameter, caffe_pb2.ParamSpec, str]],
                    force_backward: bool) -> None:
        """Apply lr_mult/decay_mult, share named params, and register learnable blobs.

        A param with lr_mult 0 gets no gradient unless the net sets force_backward, which
        in Caffe turns on every param's propagate_down.
        """
        specs = list(lp.param)
        if len(specs) > len(layer.blobs):
            raise LayerError(f"{self.source}: layer '{lp.name}' has {len(specs)} param specs "
                             f"but only {len(layer.blobs)} blobs")
        for i, blob in enumerate(layer.blobs):
            spec = specs[i] if i < len(specs) else None
            if not blob.requires_grad:      # statistics (BatchNorm): pinned to lr_mult 0
                if spec is not None and spec.HasField("lr_mult") and spec.lr_mult != 0:
                    raise LayerError(f"{self.source}: layer '{lp.name}' ({lp.type}) blob {i} "
                                     "holds statistics; its lr_mult must be 0")
                if spec is None:    # BatchNorm already appended Caffe's lr_mult-0 spec
                    own = layer.param.param
                    spec = own[i] if i < len(own) else own.add()
                spec.lr_mult = 0.0
            spec = spec or caffe_pb2.ParamSpec()
            name = spec.name
            if name and name in owners:
                owner, owner_spec, owner_layer = owners[name]
                self._check_share(owner, blob, spec, name, lp.name, owner_layer)
                for attr in ("lr_mult", "decay_mult"):
                    if spec.HasField(attr) and owner_spec.HasField(attr) and \
                            getattr(spec, attr) != getattr(owner_spec, attr):
                        raise LayerError(f"{self.source}: shared param '{name}' has conflicting "
                                         f"{attr} in layers '{owner_layer}' and '{lp.name}'")
                layer.blobs[i] = owner
                continue
            lr_mult = spec.lr_mult if spec.HasField("lr_mult") else 1.0
            decay_mult = spec.decay_mult if spec.HasField("decay_mult") else 1.0
            blob.requires_grad_(lr_mult != 0 or force_backward)
            if name:
                owners[name] = (blob, spec, lp.name)
            self.learnable_params.append(LearnableParam(f"{lp.name}/{i}", blob, lr_mult, decay_mult))

    def _check_share(self, owner, blob, spec, name, layer_name, owner_layer) -> None:
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        same = owner.numel() == blob.numel() if permissive else owner.shape == blob.shape
        if not same:
            raise LayerError(f"{self.source}: cannot share param '{name}' between layers "
                             f"'{owner_layer}' {tuple(owner.shape)} and '{layer_name}' "
                             f"{tuple(blob.shape)}: shapes differ")

    def _detach_mask(self, layer: Layer, lp: caffe_pb2.LayerParameter,
                     force_backward: bool) -> tuple[bool, ...]:
        pd = list(lp.propagate_down)
        if pd and len(pd) != len(lp.bottom):
            raise LayerError(f"{self.source}: layer '{lp.name}' has {len(pd)} propagate_down "
                             f"values for {len(lp.bottom)} bottoms")
        return tuple((j in layer.no_grad_bottoms) or (bool(pd) and not pd[j])
                     for j in range(len(lp.bottom)))

    # -- running ----------------------------------------------------------------------
    def run(self, inputs: Mapping[str, torch.Tensor], start: int = 0, end: int | None = None,
            blobs: dict[str, torch.Tensor] | None = None, keep_all: bool = True,
            record: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run layers ``start..end`` (inclusive) and return the blob dict.

        ``blobs`` supplies blobs computed earlier (for partial runs); ``inputs`` feeds the
        Input layers' tops. With ``keep_all=False`` intermediate blobs are dropped after
        their last use, which the training path uses to save memory; a whole run with
        ``keep_all=False`` (no ``blobs``, no ``record``) follows the lean plan. ``record`` receives
        the first tensor bound to each blob name (an in-place blob's diff in Caffe is the
        gradient of that first value).
        """
        lean = not keep_all and record is None and not blobs and start == 0 and end is None
        plan = self.lean_plan() if lean else self._plan
        return execute(plan, {} if blobs is None else blobs, inputs, start, end, keep_all,
                       record, source=self.source)

    def seek_data(self, batch: int) -> None:
        """Point every data layer at batch ``batch`` (absolute, so calling twice is harmless):
        a resumed run reads what an uninterrupted one would have."""
        for layer in self.layers:
            seek = getattr(layer, "seek", None)
            if seek is not None:
                seek(batch)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feed the Input blobs by name; return the output blobs (those no layer consumes)."""
        blobs = self.run(inputs, keep_all=False)
        return {name: blobs[name] for name in self.output_names}

    def forward_loss(self, keep_all: bool = False, **inputs: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward: (total weighted loss, output blobs — every blob with ``keep_all``).
        The training step uses this."""
        blobs = self.run(inputs, keep_all=keep_all)
        if keep_all:
            return self.loss(blobs), blobs
        return self.loss(blobs), {name: blobs[name] for name in self.output_names}

    def loss(self, blobs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Caffe's net loss: Σ over loss tops of loss_weight · sum(top)."""
        total = None
        for name, w in self.loss_weights.items():
            term = blobs[name].sum() * w
            total = term if total is None else total + term
        if total is None:
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        return total

    def infer_shapes(self, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        """Every blob's shape for these Input shapes (Caffe's Reshape pass)."""
        shapes = {n: tuple(s) for n, s in input_shapes.items()}
        for step in self._plan:
            layer = self.layers[step.index]
            if step.feed:
                continue
            tops = layer.top_shapes([shapes[b] for b in step.bottoms])
            shapes.update({t: tuple(int(d) for d in s) for t, s in zip(step.tops, tops)})
        return shapes

    def share_trained_layers_with(self, other: "NetModule") -> None:
        """Point this net's layer blobs at ``other``'s, matched by layer name (no copy).

        Caffe's ShareTrainedLayersWith: test nets see the train net's current weights and
        BatchNorm statistics. Shapes must agree. As in Caffe, each source layer goes to the
        first layer of its name here (a repeated source name shares into it again).
        """
        for name, source in other.named_layers():
            if name not in self.layer_names:
                continue
            layer = self.layers[self.layer_names.index(name)]
            if not len(layer.blobs) and not len(source.blobs):
                continue
            if len(source.blobs) != len(layer.blobs):
                raise LayerError(f"cannot share layer '{name}': {len(source.blobs)} blobs vs "
                                 f"{len(layer.blobs)}")
            for i, p in enumerate(source.blobs):
                if p.shape != layer.blobs[i].shape:
                    raise LayerError(f"cannot share param {i} of layer '{name}': shape "
                                     f"{tuple(p.shape)} vs {tuple(layer.blobs[i].shape)}")
                layer.blobs[i] = p

    def layer_index(self, name: str) -> int:
        """Position of the first layer called ``name`` (pycaffe's ``_layer_names.index``)."""
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise KeyError(f"{self.source}: no layer named '{name}'") from None

    def layer_bottoms(self, index: int) -> list[str]:
        """The bottoms of layer ``index`` (by position: names may repeat)."""
        return list(self._plan[index].bottoms)

    def layer_tops(self, index: int) -> list[str]:
        """Top blob names of the layer at ``index`` (unambiguous where names repeat)."""
        return list(self._plan[index].tops)

    def layer_by_name(self, name: str) -> Layer:
        """The last layer called ``name``, as Caffe's layer_by_name (layer_names_index_)."""
        for layer_name, layer in reversed(list(self.named_layers())):
            if layer_name == name:
                return layer
        raise KeyError(f"{self.source}: no layer named '{name}'")

    def named_layers(self) -> Iterable[tuple[str, Layer]]:
        return zip(self.layer_names, self.layers)


def _check_top_size(source: str, lp, top: str, shape, user_code: bool) -> None:
    """A negative or zero dim (``num: -0``), more than 32 axes or a top larger than the memory
    budget is an error at build time, before anything is allocated (``Input { dim:
    2147483647 }`` would ask for 144 GiB)."""
    try:
        check_shape(shape, f"{source}: layer '{lp.name}' ({lp.type}) top '{top}'",
                    allow_empty=user_code)   # user code may fill it at reshape
    except ResourceError as exc:
        raise LayerError(str(exc)) from None


def build_net(net_param: caffe_pb2.NetParameter, phase: int, level: int = 0,
              stages: Sequence[str] = (), source: str = "<net>",
              state: caffe_pb2.NetState | None = None,
              allow_python_layers: bool | None = None) -> NetModule:
    """Upgrade, filter for (phase, level, stages), insert Splits, and instantiate.

    ``allow_python_layers=False`` refuses ``type: "Python"`` layers (untrusted prototxt);
    None follows $CAFFE_COMPAT_PYTHON_LAYERS (see engine/layers/python_trust.py)."""
    param = caffe_pb2.NetParameter()
    param.CopyFrom(net_param)
    upgrade_net(param, source)
    if state is None:
        state = make_state(phase, level, stages,
                           base=param.state if param.HasField("state") else None)
    filtered = insert_splits(filter_net(param, state, source), source)
    with python_layers_policy(allow_python_layers):
        return NetModule(filtered, state.phase, source)
