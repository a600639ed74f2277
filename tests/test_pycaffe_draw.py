"""caffe.draw as BVLC's test_draw.py uses it (every example prototxt draws), plus pycaffe's
labels, colours, edge labels, rankdir separators and the phase filter."""
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

pytest.importorskip("pydot")
import caffe  # noqa: E402
import caffe.draw  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NET = """name: "n"
layer { name: "data" type: "Data" top: "data" top: "label" data_param { batch_size: 64 }
        include { phase: TRAIN } }
layer { name: "test_data" type: "Data" top: "data" top: "label" data_param { batch_size: 10 }
        include { phase: TEST } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _net(text=NET):
    return text_format.Merge(text, caffe_pb2.NetParameter())


def test_labels_follow_pycaffe():
    conv = _net().layer[2]
    assert caffe.draw.get_layer_label(conv, "LR") == \
        r'"conv1\n(Convolution)\nkernel size: 5\nstride: 2\npad: 1"'
    assert caffe.draw.get_layer_label(conv, "TB", display_lrm=True) == \
        '"conv1 (Convolution) kernel size: 5 stride: 2 pad: 1 lr mult: 1.0, 2.0"'
    assert caffe.draw.get_layer_label(_net().layer[4], "BT") == \
        '"pool1 (Pooling AVE) kernel size: 2 stride: 2 pad: 0"'
    assert caffe.draw.get_edge_label(_net().layer[0]) == "Batch 64"
    assert caffe.draw.get_edge_label(conv) == "20"
    with pytest.raises(ValueError):
        caffe.draw.get_layer_lr_mult(_net().layer[3])


def test_graph_nodes_and_phase_filter():
    graph = caffe.draw.get_pydot_graph(_net(), "LR", phase=caffe_pb2.TEST)
    names = [n.get_name() for n in graph.get_nodes()]
    assert not any("Batch 64" in e.get_label() for e in graph.get_edges())
    assert any("Batch 10" in e.get_label() for e in graph.get_edges())
    assert '"relu1\\n(ReLU)"' in names
    relu = [n for n in graph.get_nodes() if n.get_name() == '"relu1\\n(ReLU)"'][0]
    assert relu.get("fillcolor") == "#90EE90"
    conv = [n for n in graph.get_nodes() if n.get_name().startswith('"conv1')][0]
    assert conv.get("fillcolor") == "#FF5050"
    both = _net(NET.replace("include { phase: TEST }", "include { phase: TEST } exclude { phase: TRAIN }"))
    with pytest.raises(ValueError, match="both include and exclude"):
        caffe.draw.get_pydot_graph(both, "LR", phase=caffe_pb2.TEST)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")
def test_every_repo_prototxt_draws(tmp_path):
    files = [p for p in (ROOT / "models").rglob("*.prototxt") if "solver" not in p.name]
    files += sorted((ROOT / "tests" / "data" / "net_spec").glob("*.prototxt"))
    assert files
    for path in files:
        net = text_format.Merge(path.read_text(), caffe_pb2.NetParameter())
        assert caffe.draw.draw_net(net, "LR", ext="svg").lstrip().startswith(b"<")
    out = tmp_path / "net.png"
    caffe.draw.draw_net_to_file(_net(), str(out), "TB", phase=caffe_pb2.TRAIN)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
