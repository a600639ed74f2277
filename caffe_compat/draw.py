"""pycaffe's ``caffe.draw``: a NetParameter as a Graphviz graph (through pydot).

Layers are records (in-place neuron layers light green; Convolution/Deconvolution red,
Pooling orange, InnerProduct purple, others blue), blobs are grey octagons; labels read
``name``, ``(Type)`` (``(Pooling MAX)``), the kernel/stride/pad of spatial layers and,
with ``display_lrm``, the lr multipliers — separated by spaces for vertical layouts
(TB/BT) and by line breaks for horizontal ones, as pycaffe does. Edges out of Data,
Convolution and InnerProduct layers carry the batch size or num_output.

Needs ``pydot`` (pip) and Graphviz's ``dot`` (Debian/Ubuntu: ``apt-get install graphviz``;
``make setup`` installs it where apt is available). tools/draw_net.py draws without them.
"""
from __future__ import annotations

from caffe_compat.formats.atomic import write_bytes
from caffe_compat.proto import caffe_pb2

try:
    import pydot
except ImportError as exc:           # pragma: no cover - depends on the environment
    raise ImportError("caffe.draw needs pydot: pip install pydot (and Graphviz's 'dot': "
                      "apt-get install graphviz)") from exc

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
_LEARNING = ("Convolution", "Deconvolution", "InnerProduct")


def get_pooling_types_dict() -> dict[int, str]:
    """Pooling method number -> name (0 -> "MAX")."""
    enum = caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR
    return {value.number: name for name, value in enum.values_by_name.items()}


def get_edge_label(layer) -> str:
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer) -> tuple[float, float]:
    """(weight, bias) lr_mult of a Convolution/Deconvolution/InnerProduct layer."""
    if layer.type not in _LEARNING:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    specs = list(layer.param)
    if len(specs) > 2:
        raise ValueError("Could not parse the learning rate multiplier")
    mults = [s.lr_mult for s in specs] + [1.0] * (2 - len(specs))
    return mults[0], mults[1]


def _spatial(layer) -> tuple[int, int, int]:
    if layer.type == "Pooling":
        p = layer.pooling_param
        return p.kernel_size, p.stride, p.pad
    p = layer.convolution_param
    first = lambda values, default: values[0] if len(values) else default  # noqa: E731
    return first(p.kernel_size, 1), first(p.stride, 1), first(p.pad, 0)


def get_layer_label(layer, rankdir: str, display_lrm: bool = False) -> str:
    """The node label (double-quoted, so colons survive Graphviz's parser)."""
    sep = " " if rankdir in ("TB", "BT") else r"\n"
    if layer.type == "Pooling":
        kind = f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})"
    else:
        kind = f"({layer.type})"
    parts = [layer.name, kind]
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        kernel, stride, pad = _spatial(layer)
        parts.append(sep.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]))
    if display_lrm and layer.type in _LEARNING:
        w, b = get_layer_lr_mult(layer)
        if w or b:
            parts.append(f"lr mult: {w:.1f}, {b:.1f}")
    return '"' + sep.join(parts) + '"'


def choose_color_by_layertype(layertype: str) -> str:
    return {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
            "InnerProduct": "#CC33FF"}.get(layertype, "#6495ED")


def _included(layer, phase) -> bool:
    """pycaffe's phase filter: include rules by phase only, exclude rules remove."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise ValueError(f"layer {layer.name} has both include and exclude specified.")
    included = len(layer.include) == 0 or any(r.phase == phase for r in layer.include)
    return included and not any(r.phase == phase for r in layer.exclude)


def get_pydot_graph(caffe_net, rankdir: str, label_edges: bool = True, phase=None,
                    display_lrm: bool = False):
    """A ``pydot.Dot`` of the net (layers of ``phase`` only when given)."""
    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes: dict[str, pydot.Node] = {}
    edges: list[tuple[str, str, str]] = []
    for layer in caffe_net.layer:
        if not _included(layer, phase):
            continue
        label = get_layer_label(layer, rankdir, display_lrm=display_lrm)
        key = f"{layer.name}_{layer.type}"
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and \
            layer.bottom[0] == layer.top[0]
        style = NEURON_LAYER_STYLE if in_place else \
            dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(layer.type))
        nodes[key] = pydot.Node(label, **style)
        for bottom in layer.bottom:
            nodes[bottom + "_blob"] = pydot.Node(bottom, **BLOB_STYLE)
            edges.append((bottom + "_blob", key, '""'))
        for top in layer.top:
            nodes[top + "_blob"] = pydot.Node(top)
            edges.append((key, top + "_blob", get_edge_label(layer) if label_edges else '""'))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label))
    return graph


def draw_net(caffe_net, rankdir: str, ext: str = "png", phase=None,
             display_lrm: bool = False) -> bytes:
    """The drawing as bytes in format ``ext`` (png, svg, pdf, dot, raw, ...)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    try:
        return graph.create(format=ext)
    except FileNotFoundError as exc:
        raise RuntimeError("caffe.draw needs Graphviz's 'dot' program: install the graphviz "
                           "package (apt-get install graphviz) or use tools/draw_net.py, "
                           "which draws with matplotlib") from exc


def draw_net_to_file(caffe_net, filename: str, rankdir: str = "LR", phase=None,
                     display_lrm: bool = False) -> None:
    """Write the drawing to ``filename``; its extension picks the format ('.raw' gives the
    Graphviz source)."""
    ext = filename[filename.rfind(".") + 1:]
    write_bytes(filename, draw_net(caffe_net, rankdir, ext, phase, display_lrm))
