"""pycaffe's NetSpec: write nets as Python calls, get a ``NetParameter``.

``layers.Convolution(bottom, kernel_size=3, num_output=8)`` returns a ``Top`` (or a tuple
of Tops for ``ntop=2``, or the ``Function`` itself for ``ntop=0``). ``to_proto(*tops)``
or ``NetSpec().to_proto()`` walks the graph and emits one ``LayerParameter`` per
``Function``, bottoms first. The rules follow pycaffe's so that generated prototxt text is
identical:

* Keyword arguments go into the layer's own ``<type>_param`` message when it has such a
  field, else into the LayerParameter itself; names ending in ``param`` always go to the
  LayerParameter (``param=[dict(lr_mult=1)]``, ``transform_param=dict(...)``).
* Lists become repeated fields (lists of dicts become repeated messages), dicts become
  messages, and a scalar given for a repeated field becomes a one-element list.
* ``ntop`` and ``in_place`` are consumed, never written.
* Names: a NetSpec names each top it holds by its attribute; other tops are named
  ``<Type><k>`` counting per type in the order they are reached; a layer takes its first
  top's name (``ntop=0`` layers count their own ``<Type><k>``). In-place layers reuse
  their bottoms as tops.

NetSpec also has the methods weiliu89/caffe (SSD) added for its ``model_libs`` builders:
``keys()`` (top names in insertion order, a list), ``vals()``, ``update(name, params)``
(merge keyword parameters into the layer behind a top) and ``del spec[name]``.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

from caffe_compat.proto import caffe_pb2

__all__ = ["layers", "params", "NetSpec", "to_proto", "Top", "Function", "assign_proto",
           "param_name_dict"]


def param_name_dict() -> dict[str, str]:
    """Layer type name -> its ``*_param`` field prefix ("InnerProduct" -> "inner_product").

    Derived from LayerParameter: each ``foo_param`` field's message type is
    ``FooParameter``. A message type used by several fields (Convolution for Deconvolution)
    maps from its own name only.
    """
    mapping = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                mapping[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    return mapping


def to_proto(*tops) -> caffe_pb2.NetParameter:
    """A NetParameter with every layer needed to compute ``tops`` (auto-named)."""
    layer_protos: "OrderedDict[Function, caffe_pb2.LayerParameter]" = OrderedDict()
    counts: Counter = Counter()
    for top in tops:
        top.fn._to_proto(layer_protos, {}, counts)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layer_protos.values())
    return net


def assign_proto(proto, name: str, value) -> None:
    """Set field ``name`` of ``proto`` from a Python value (see the module docstring)."""
    is_repeated = hasattr(getattr(proto, name), "extend")
    if is_repeated and not isinstance(value, list):
        value = [value]
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for item in value:
                message = getattr(proto, name).add()
                for key, sub in item.items():
                    assign_proto(message, key, sub)
        else:
            getattr(proto, name).extend(value)
    elif isinstance(value, dict):
        for key, sub in value.items():
            assign_proto(getattr(proto, name), key, sub)
    else:
        setattr(proto, name, value)


class Top:
    """One output blob of a Function (output ``n`` of ``fn``)."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        return to_proto(self)

    def _update(self, params: dict) -> None:
        self.fn._update(params)

    def _to_proto(self, layer_protos, names, counts) -> None:
        self.fn._to_proto(layer_protos, names, counts)


class Function:
    """One layer: its type, its input Tops and its parameters (keyword arguments)."""

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        for index, item in enumerate(inputs):
            if not isinstance(item, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is "
                                f"{type(item)})")
        self.inputs = inputs
        self.params = params
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _update(self, params: dict) -> None:
        """Merge keyword parameters given after construction (a key given again replaces
        the earlier value, as a keyword would)."""
        for key in ("ntop", "in_place"):
            if key in params:
                raise ValueError(f"{self.type_name}: '{key}' is fixed when the layer is "
                                 "made; it cannot be updated")
        self.params.update(params)

    def _auto_name(self, type_name: str, counts: Counter) -> str:
        counts[type_name] += 1
        return f"{type_name}{counts[type_name]}"

    def _top_name(self, top: Top, names: dict, counts: Counter) -> str:
        if top not in names:
            names[top] = self._auto_name(top.fn.type_name, counts)
        return names[top]

    def _layer_name(self, names: dict, counts: Counter) -> str:
        if self not in names:
            names[self] = (self._top_name(self.tops[0], names, counts) if self.ntop > 0
                           else self._auto_name(self.type_name, counts))
        return names[self]

    def _to_proto(self, layer_protos, names, counts) -> None:
        if self in layer_protos:
            return
        bottoms = []
        for item in self.inputs:
            item._to_proto(layer_protos, names, counts)
            bottoms.append(layer_protos[item.fn].top[item.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(self._top_name(t, names, counts) for t in self.tops)
        layer.name = self._layer_name(names, counts)
        for key, value in self.params.items():
            self._assign(layer, key, value)
        layer_protos[self] = layer

    def _assign(self, layer, key: str, value) -> None:
        if key.endswith("param"):
            assign_proto(layer, key, value)
            return
        try:
            assign_proto(getattr(layer, _PARAM_NAMES[self.type_name] + "_param"), key, value)
        except (AttributeError, KeyError):
            assign_proto(layer, key, value)


class _MissingTop(AttributeError, KeyError):
    """A NetSpec has no top of that name (pycaffe raises KeyError; AttributeError keeps
    ``hasattr`` and copying working)."""


class NetSpec:
    """Holds named Tops (set as attributes or items); ``to_proto`` names blobs after them."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        try:
            return self.__dict__["tops"][name]
        except KeyError:
            raise _MissingTop(name) from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.__getattr__(item)

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def keys(self) -> list:
        """Names of the held tops in the order they were set (a list, so ``keys()[-1]``)."""
        return list(self.tops)

    def vals(self) -> list:
        return list(self.tops.values())

    def update(self, name: str, params: dict) -> None:
        """Merge ``params`` into the keyword parameters of the layer that made top ``name``."""
        self[name]._update(params)

    def to_proto(self) -> caffe_pb2.NetParameter:
        names = {value: key for key, value in self.tops.items()}
        counts: Counter = Counter()
        layer_protos: "OrderedDict[Function, caffe_pb2.LayerParameter]" = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layer_protos, names, counts)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layer_protos.values())
        return net


class Layers:
    """``layers.<Type>(*bottoms, **params)``: a Function of that layer type."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def make_layer(*args, **kwargs):
            fn = Function(type_name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        return make_layer


class _ParameterEnums:
    def __init__(self, type_name: str):
        self._type_name = type_name

    def __getattr__(self, value_name: str):
        return getattr(getattr(caffe_pb2, self._type_name + "Parameter"), value_name)


class Parameters:
    """``params.Pooling.MAX``: the enum value ``caffe_pb2.PoolingParameter.MAX``."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        return _ParameterEnums(type_name)


_PARAM_NAMES = param_name_dict()
layers = Layers()
params = Parameters()
