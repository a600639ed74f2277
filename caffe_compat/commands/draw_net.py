"""Draw a net's layer graph as a PNG with matplotlib (no graphviz needed).

One box per layer with its name, type and top shape (without the batch axis); in-place layers
(ReLU, Dropout, ...) are folded into the box of the layer whose top they modify, and the
automatic Split layers are left out. Layers are placed top to bottom by their depth in the
graph (longest path from an input); the longest path runs down the left column and branches
sit to its right. Edges that skip rows are drawn as arcs, long ones dashed.

Data layers are drawn as the Input layers of the same shapes (see caffe_compat.engine.analysis),
so no database is needed.

    python tools/draw_net.py models/vgg16_landmark_64/train_val.prototxt net.png --phase TRAIN
"""
from __future__ import annotations

import argparse
import os
import sys


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from caffe_compat.formats.atomic import save_figure
from caffe_compat.engine import analysis
from caffe_compat.engine.layers.base import TEST, TRAIN

COLOURS = {
    "Convolution": "#9ecae1", "Deconvolution": "#c6a8e0", "Pooling": "#a1d99b",
    "InnerProduct": "#fdd49e", "Eltwise": "#fdae6b", "Input": "#d9d9d9", "Data": "#d9d9d9",
    "LRN": "#c7e9c0", "Tile": "#fee391", "Sigmoid": "#fee391", "Softmax": "#fcbba1",
    "LandmarkHeatmap": "#d9d9d9",
}
LOSS_COLOUR, OTHER_COLOUR = "#fc9272", "#f0f0f0"


def _shape_text(shape) -> str:
    dims = list(shape[1:])
    return "×".join(str(d) for d in dims) if dims else "scalar"


def build_graph(net):
    """Nodes (one per non-in-place, non-Split layer) and edges between them."""
    nodes, edges = [], []
    producer: dict[str, int] = {}                # blob -> node index
    for name, layer in net.named_layers():
        bottoms, tops = net.bottom_names[name], net.top_names[name]
        if layer.type == "Split":
            for t in tops:
                producer[t] = producer[bottoms[0]]
            continue
        if tops and tops == bottoms[:len(tops)] and bottoms[0] in producer:
            nodes[producer[bottoms[0]]]["inplace"].append(layer.type)   # in-place: fold in
            continue
        index = len(nodes)
        shape = net.blob_shapes[tops[0]] if tops else ()
        nodes.append(dict(name=name, type=layer.type, shape=shape, inplace=[],
                          loss=any(t in net.loss_weights for t in tops)))
        for b in dict.fromkeys(bottoms):
            if b in producer:
                edges.append((producer[b], index))
        for t in tops:
            producer[t] = index
    return nodes, edges


def layout(nodes, edges):
    """(x, row) per node.

    Rows: longest path from a source; a node fed only by sources (a target renderer, say) moves
    down to just above its first consumer. The longest source-to-sink path is the trunk, in
    column 0; every other node takes the free column >= 1 nearest its parents' mean.
    """
    parents = {i: [] for i in range(len(nodes))}
    children = {i: [] for i in range(len(nodes))}
    for a, b in edges:
        parents[b].append(a)
        children[a].append(b)
    row = [0] * len(nodes)
    for i in range(len(nodes)):                  # nodes are in layer order: a topological order
        row[i] = max((row[a] + 1 for a in parents[i]), default=0)
    for i in range(len(nodes)):
        if parents[i] and children[i] and all(not parents[a] for a in parents[i]):
            row[i] = max(row[i], min(row[c] for c in children[i]) - 1)
    trunk, node = set(), max(range(len(nodes)), key=lambda i: (row[i], i))
    while True:
        trunk.add(node)
        prev = [a for a in parents[node] if row[a] == row[node] - 1]
        if not prev:
            break
        node = prev[0]
    column, used = {}, set()
    for i in sorted(range(len(nodes)), key=lambda i: (row[i], i)):
        if i in trunk:
            column[i] = 0
        else:
            want = max(1, round(sum(column[a] for a in parents[i]) / len(parents[i]))
                       if parents[i] else 1)
            while (row[i], want) in used:
                want += 1
            column[i] = want
        used.add((row[i], column[i]))
    return {i: (column[i], row[i]) for i in column}, max(column.values()) + 1, max(row) + 1


def draw(net, out: str, title: str | None = None, dpi: int = 60) -> None:
    """Write the PNG of a built NetModule's graph to ``out``."""
    nodes, edges = build_graph(net)
    pos, width, height = layout(nodes, edges)
    col_w, row_h = 2.6, 0.62
    fig = plt.figure(figsize=(max(4.0, (width + 0.35) * col_w), height * row_h + 0.6))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_ylim(height - 0.4, -0.6 - (0.5 if title else 0))
    ax.axis("off")
    box_w, box_h = 0.88, 0.72
    for i, n in enumerate(nodes):
        x, y = pos[i]
        colour = LOSS_COLOUR if n["loss"] else COLOURS.get(n["type"], OTHER_COLOUR)
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.01,rounding_size=0.08",
                                    fc=colour, ec="#444444", lw=0.8))
        kind = n["type"] + "".join(f"+{t}" for t in n["inplace"])
        ax.text(x, y - 0.14, n["name"], ha="center", va="center", fontsize=8, weight="bold")
        ax.text(x, y + 0.16, f"{kind}  {_shape_text(n['shape'])}", ha="center", va="center",
                fontsize=7)
    lanes: dict[int, int] = {}
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        far = yb - ya > 4
        style = dict(color="#999999" if far else "#444444", lw=0.7 if far else 0.9,
                     linestyle="--" if far else "-")
        if yb - ya > 1 and xa == xb:
            # Skip edge within a column: route it through the margin beside the column.
            side = -1 if xa == 0 else 1
            k = lanes[xa] = lanes.get(xa, -1) + 1
            xm = xa + side * (box_w / 2 + 0.06 + 0.05 * (k % 4))
            xs = [xa + side * box_w / 2, xm, xm, xb + side * box_w / 2]
            ax.plot(xs[:3], [ya, ya, yb], **style)
            ax.add_patch(FancyArrowPatch((xm, yb), (xs[3], yb), arrowstyle="-|>",
                                         mutation_scale=8, **style))
        else:
            ax.add_patch(FancyArrowPatch((xa, ya + box_h / 2), (xb, yb - box_h / 2),
                                         arrowstyle="-|>", mutation_scale=8, **style))
    if title:
        ax.text((width - 1) / 2, -0.85, title, ha="center", va="center", fontsize=11, weight="bold")
    save_figure(fig, out, dpi=dpi)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prototxt", help="net definition (train_val or deploy prototxt)")
    ap.add_argument("output", help="PNG file to write")
    ap.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                    help="which phase's layers to draw (default TRAIN)")
    ap.add_argument("--channels", type=int, default=3,
                    help="image channels that data layers produce (default 3)")
    ap.add_argument("--dpi", type=int, default=60, help="resolution (default 60)")
    ap.add_argument("--title", default=None, help="title above the graph (default: net name)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.prototxt):
        ap.error(f"{args.prototxt}: no such file")
    net = analysis.load_net(args.prototxt, TRAIN if args.phase == "TRAIN" else TEST,
                            channels=args.channels)
    draw(net, args.output, args.title or f"{net.name} ({args.phase})", args.dpi)
    print(f"wrote {args.output}")
    return 0

