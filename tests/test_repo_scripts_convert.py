"""Model-conversion and inspection tools of other repositories, in their style, run unchanged
through ``import caffe``: ethereon/caffe-tensorflow's kaffe (resolver, GraphBuilder, shapes,
DataInjector), microsoft/MMdnn's caffe frontend and emitted NetSpec scripts, pytorch-caffe's
and caffe-onnx's protobuf loaders, hahnyuan/nn_tools' caffemodel editing, BVLC's
tools/extra/summarize.py and python/draw_net.py. A tiny net is written in the new and the
legacy V1 format, saved by ``net.save`` (or by hand in V1 Caffe's layout), read back through
``caffe_pb2`` field by field, and run by a float64 numpy forward built from those fields."""
from __future__ import annotations

import copy
import math
import shutil

import numpy as np
import pytest
from google.protobuf import text_format

import caffe
from caffe import layers as L, params as P
from convert_reference import forward, kernel_params, layer_kind, read_def

NEW = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride: 2 stride: 1 pad: 1 pad: 0 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1" include { phase: TRAIN } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
V1 = """name: "tinyv1"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 9 input_dim: 8
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layers { name: "drop" type: DROPOUT bottom: "pool1" top: "pool1" include { phase: TRAIN } }
layers { name: "fc" type: INNER_PRODUCT bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
"""
# Caffe's conv rounds down, its pooling up: the shapes every converter recomputes.
SHAPES = {"NEW": {"conv1": (2, 4, 5, 7), "pool1": (2, 4, 3, 4), "fc": (2, 5)},
          "V1": {"conv1": (2, 4, 5, 4), "pool1": (2, 4, 3, 2), "fc": (2, 5)}}
pb = caffe.proto.caffe_pb2           # kaffe/caffe/resolver.py: the installed pycaffe's module


def _params_from_caffemodel(path):
    """kaffe's/MMdnn's load_using_pb + normalize_pb_data: shape.dim, else legacy N, C, H, W."""
    data = pb.NetParameter()
    data.MergeFromString(open(path, "rb").read())
    out = {}
    for layer in (data.layers or data.layer):
        arrays = []
        for blob in layer.blobs:
            dims = list(blob.shape.dim) if len(blob.shape.dim) else \
                [blob.num, blob.channels, blob.height, blob.width]
            arrays.append(np.array(blob.data, dtype=np.float32).reshape(dims))
        if arrays:
            out[layer.name] = arrays
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """NEW and V1 defs with random weights written by ``net.save``; the weights written."""
    folder, rng, out = tmp_path_factory.mktemp("convert"), np.random.RandomState(7), {}
    for tag, text in (("NEW", NEW), ("V1", V1)):
        proto, model = str(folder / f"{tag}.prototxt"), str(folder / f"{tag}.caffemodel")
        open(proto, "w").write(text)
        net = caffe.Net(proto, caffe.TEST)
        written = {}
        for name, blobs in net.params.items():
            for blob in blobs:
                blob.data[...] = rng.uniform(0.5, 1.5, blob.data.shape) if name == "bn1" \
                    else rng.randn(*blob.data.shape)
            written[name] = [b.data.copy() for b in blobs]
        net.save(model)
        out[tag] = (proto, model, written)
    return out


@pytest.mark.parametrize("tag", ["NEW", "V1"])
def test_caffe_tensorflow_graph_and_data_injector(saved, tag):
    proto, model, written = saved[tag]
    net_def, layers, dims = read_def(proto)
    assert dims == [2, 3, 9, 8] and "drop" not in [lr.name for lr in layers]
    # kaffe/shapes.py: conv floors, pooling ceils; num_output only where the params have it.
    shape = tuple(dims)
    for lr in layers:
        kind = layer_kind(lr)
        if kind in ("Convolution", "Pooling"):
            params = lr.convolution_param if kind == "Convolution" else lr.pooling_param
            kh, kw, sh, sw, ph, pw = kernel_params(params)
            rnd = math.floor if kind == "Convolution" else math.ceil
            c = params.num_output if hasattr(params, "num_output") else shape[1]
            shape = (shape[0], c, int(rnd((shape[2] + 2 * ph - kh) / float(sh) + 1)),
                     int(rnd((shape[3] + 2 * pw - kw) / float(sw) + 1)))
        elif kind == "InnerProduct":
            shape = (shape[0], lr.inner_product_param.num_output)
        if lr.name in SHAPES[tag]:
            assert shape == SHAPES[tag][lr.name], lr.name
    # which *_param a layer sets, as translators find it: ListFields / HasField
    set_params = {lr.name: [f.name for f, _ in lr.ListFields() if f.name.endswith("_param")]
                  for lr in layers}
    assert set_params["conv1"] == ["convolution_param"] and set_params["relu1"] == []
    assert layers[1 if tag == "NEW" else 0].HasField("convolution_param")
    # DataInjector.load_using_caffe against load_using_pb, and both against what was written.
    net = caffe.Net(proto, model, caffe.TEST)
    assert {k: tuple(b.data.shape) for k, b in net.blobs.items() if k in SHAPES[tag]} == SHAPES[tag]
    by_caffe = [(k, list(map(lambda blob: blob.data, v))) for k, v in net.params.items()]
    by_pb = _params_from_caffemodel(model)
    assert [k for k, _ in by_caffe] == list(by_pb) == list(written)
    for name, arrays in by_caffe:
        for got, pbv, want in zip(arrays, by_pb[name], written[name]):
            assert got.shape == pbv.shape == want.shape
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(pbv, want)
    x = np.random.RandomState(1).randn(*dims)
    net.blobs["data"].data[...] = x
    out = net.forward()
    ref = forward(layers, written, x)
    np.testing.assert_allclose(out["prob"], ref["prob"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["fc"].data, ref["fc"], rtol=1e-4, atol=1e-4)


def test_mmdnn_emitted_netspec_and_prototxt_from_caffemodel(tmp_path):
    """MMdnn's emitted KitModel/make_net/gen_weight, then its frontend on that caffemodel with
    no prototxt: blobs stripped, the rest written as the deploy prototxt."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=[dict(dim=[1, 2, 7, 6])], ntop=1)
    n.conv = L.Convolution(n.data, kernel_h=3, kernel_w=2, stride=1, num_output=3, pad_h=1,
                           pad_w=0, group=1, bias_term=True, ntop=1)
    n.bn = L.BatchNorm(n.conv, eps=1e-3, use_global_stats=True, ntop=1)
    n.scale = L.Scale(n.bn, bias_term=True, in_place=True, ntop=1)
    n.relu = L.ReLU(n.scale, in_place=True, ntop=1)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=2, stride=2, ntop=1)
    n.fc = L.InnerProduct(n.pool, num_output=4, bias_term=True, ntop=1)
    n.prob = L.Softmax(n.fc, ntop=1)
    prototxt, model = str(tmp_path / "kit.prototxt"), str(tmp_path / "kit.caffemodel")
    with open(prototxt, "w") as fpb:
        print(n.to_proto(), file=fpb)
    rng = np.random.RandomState(3)
    weights = {"conv": {"weights": rng.randn(3, 2, 3, 2), "bias": rng.randn(3)},
               "bn": {"mean": rng.randn(3), "var": rng.uniform(0.5, 2, 3), "scale": [1.0]},
               "scale": {"scale": rng.randn(3), "bias": rng.randn(3)},
               "fc": {"weights": rng.randn(4, 3 * 4 * 3), "bias": rng.randn(4)}}
    net = caffe.Net(prototxt, caffe.TRAIN)
    for key in weights:                 # gen_weight's .flat writes
        if "weights" in weights[key]:
            net.params[key][0].data.flat = weights[key]["weights"]
        elif "mean" in weights[key]:
            net.params[key][0].data.flat = weights[key]["mean"]
            net.params[key][1].data.flat = weights[key]["var"]
            net.params[key][2].data.flat = weights[key]["scale"]
        elif "scale" in weights[key]:
            net.params[key][0].data.flat = weights[key]["scale"]
        if "bias" in weights[key]:
            net.params[key][1].data.flat = weights[key]["bias"]
    net.save(model)
    caffemodel = pb.NetParameter()
    caffemodel.MergeFromString(open(model, "rb").read())
    bn = next(lr for lr in caffemodel.layer if lr.name == "bn")
    assert [p.lr_mult for p in bn.param] == [0, 0, 0]      # Caffe's BatchNorm adds one per blob
    assert [list(b.shape.dim) for b in bn.blobs] == [[3], [3], [1]]
    for item in caffemodel.layers or caffemodel.layer:
        item.ClearField("blobs")
    deploy = str(tmp_path / "deploy.prototxt")
    with open(deploy, "w") as f:
        f.write(str(caffemodel))
    shapes = caffe.Net(deploy, caffe.TEST)       # compute_output_shapes
    dims = {key: list(value.shape) + [1] * (4 - len(value.shape))
            for key, value in shapes.blobs.items()}
    assert dims == {"data": [1, 2, 7, 6], "conv": [1, 3, 7, 5], "bn": [1, 3, 7, 5],
                    "pool": [1, 3, 4, 3], "fc": [1, 4, 1, 1], "prob": [1, 4, 1, 1]}
    reloaded = caffe.Net(deploy, model, caffe.TEST)
    x = rng.randn(1, 2, 7, 6)
    reloaded.blobs["data"].data[...] = x
    got = reloaded.forward()["prob"]
    _, layers, _ = read_def(deploy)
    flat = {k: list(v.values()) for k, v in weights.items()}     # in blob order
    np.testing.assert_allclose(got, forward(layers, flat, x)["prob"], rtol=1e-4, atol=1e-6)
    # get_layer_list: which LayerParameter messages this caffe_pb2 offers.
    layer = pb.LayerParameter()
    names = [type(getattr(layer, f.name)).__name__[:-len("Parameter")]
             for f in layer.DESCRIPTOR.fields if f.name.endswith("_param")]
    assert {"Convolution", "Pooling", "BatchNorm", "Clip"} <= set(names)


def test_mmdnn_train_proto_surgery(tmp_path):
    """process_train_proto on a V1 train net: data and loss layers removed, input_dim added,
    a SOFTMAX (enum 20) appended, then pycaffe computes the shapes."""
    train = 'layers { name: "d" type: DATA top: "data" top: "label" data_param { source: "x" } }'
    train += V1.split("input_dim: 8", 1)[1].replace(" type: SOFTMAX bottom: \"fc\"",
                                                    ' type: SOFTMAX_LOSS bottom: "fc" bottom: "label"')
    model = text_format.Merge(train, pb.NetParameter())
    layers = model.layer or model.layers
    assert pb.V1LayerParameter.LayerType.Name(layers[0].type) == "DATA"
    assert list(layers[1].blobs_lr) == [1, 2] and list(layers[1].weight_decay) == [1, 0]
    for layer in layers[:]:
        if layer.type == pb.V1LayerParameter.LayerType.Value("DATA"):
            layers.remove(layer)
    model.input.append("data")
    model.input_dim.extend([1, 3, 9, 8])
    last = layers[-1]
    pred = layers.add(name="prob", type=20, top=["prob"])
    pred.bottom.append(last.bottom[0])
    layers.remove(last)
    path = str(tmp_path / "train_as_deploy.prototxt")
    with open(path, "w") as f:
        f.write(text_format.MessageToString(model))
    net = caffe.Net(path, caffe.TEST)
    assert {k: v.data.shape[1:] for k, v in net.blobs.items() if k in SHAPES["V1"]} == \
        {k: v[1:] for k, v in SHAPES["V1"].items()}
    assert [lr.type for lr in net.layers] == ["Input", "Convolution", "ReLU", "Pooling",
                                              "InnerProduct", "Softmax"]


def test_pytorch_caffe_onnx_and_mxnet_loaders(saved, tmp_path):
    proto, model, written = saved["NEW"]
    net_def = pb.NetParameter()
    text_format.Merge(open(proto).read(), net_def)
    weights = pb.NetParameter()
    weights.ParseFromString(open(model, "rb").read())
    lmap = {lr.name: lr for lr in (weights.layer or weights.layers)}
    bn = lmap["bn1"]                    # load_weights: running stats over blobs[2].data[0]
    np.testing.assert_allclose(np.array(bn.blobs[0].data) / bn.blobs[2].data[0],
                               written["bn1"][0] / written["bn1"][2][0], rtol=1e-6)
    # caffe-onnx: inputs from the Input layer, attributes from == [] tests on repeated fields
    assert net_def.input == [] and net_def.layer[0].type == "Input"
    assert list(net_def.layer[0].input_param.shape[0].dim) == [2, 3, 9, 8]
    conv = net_def.layer[1].convolution_param
    kernel = [conv.kernel_h, conv.kernel_w] if conv.kernel_size == [] else \
        np.array([conv.kernel_size] * 2).reshape(1, -1)[0].tolist()
    strides = list(conv.stride) if conv.stride != [] else [1, 1]
    assert kernel == [3, 2] and list(conv.pad) == [1, 0] and strides == [2, 1]
    params = copy.deepcopy(lmap["conv1"].blobs)
    assert [list(p.shape.dim) for p in params] == [[4, 3, 3, 2], [4]]
    assert [list(p.shape.dim) for p in lmap["bn1"].blobs] == [[4], [4], [1]]
    # a mean file read as pytorch-caffe does: BlobProto.ParseFromString, mean over H, W
    mean = np.arange(3 * 9 * 8, dtype=np.float32).reshape(1, 3, 9, 8)
    with open(tmp_path / "mean.binaryproto", "wb") as f:
        f.write(caffe.io.array_to_blobproto(mean).SerializeToString())
    mean_blob = pb.BlobProto()
    mean_blob.ParseFromString(open(tmp_path / "mean.binaryproto", "rb").read())
    mu = np.array(mean_blob.data)
    mu.resize(3, 9, 8)
    np.testing.assert_allclose(mu.mean(1).mean(1), mean[0].mean(axis=(1, 2)))
    # MXNet's caffe_converter with pycaffe: net.layers[i].blobs, a shape without .dim
    net = caffe.Net(proto, model, caffe.TEST)
    for name, layer in zip(net._layer_names, net.layers):
        for i, blob in enumerate(layer.blobs):
            dims = blob.shape.dim if getattr(blob.shape, "dim", None) is not None \
                else list(blob.shape)
            np.testing.assert_array_equal(np.array(blob.data).reshape(dims), written[name][i])
    assert net.layers[2].type == "BatchNorm" and net.layers[2].blobs[2].data[0] != 0
    # CaffeData: a net over an empty weights file keeps its initial parameters
    open(tmp_path / "empty.caffemodel", "w").close()
    caffe.set_mode_cpu()
    empty = caffe.Net(proto, str(tmp_path / "empty.caffemodel"), caffe.TEST)
    assert list(empty.params) == list(written)


def test_nn_tools_caffemodel_editing(saved, tmp_path):
    """nn_tools' Caffemodel: blobs rebuilt by hand (shape.dim, data.extend), data[:] set in
    place, layers inserted and deleted; the prototxt saved without blobs; pycaffe loads it."""
    proto, model, written = saved["NEW"]
    cm = pb.NetParameter()
    with open(model, "rb") as f:
        cm.ParseFromString(f.read())
    fc = next(lr for lr in cm.layer if lr.name == "fc")
    new_fc = [np.full((5, 48), 0.01) * np.arange(5)[:, None], np.linspace(-1, 1, 5)]
    del fc.blobs[:]
    for data in new_fc:
        blob = fc.blobs.add()
        for dim in data.shape:
            blob.shape.dim.append(dim)
        blob.data.extend(data.flatten().astype(float))
    fc.blobs[1].data[:] = (new_fc[1] * 2).flatten()
    relu = pb.LayerParameter(name="relu2", type="ReLU", bottom=["fc"], top=["fc"])
    index = [lr.name for lr in cm.layer].index("fc") + 1
    cm.layer.add()
    for i in range(len(cm.layer) - 1, index, -1):
        cm.layer[i].CopyFrom(cm.layer[i - 1])
    cm.layer[index].CopyFrom(relu)
    del cm.layer[[lr.name for lr in cm.layer].index("relu1")]
    edited = str(tmp_path / "edited.caffemodel")
    with open(edited, "wb") as f:
        f.write(cm.SerializeToString())
    prototxt = pb.NetParameter()
    prototxt.CopyFrom(cm)
    for layer in prototxt.layer:
        del layer.blobs[:]
    with open(tmp_path / "edited.prototxt", "w") as f:
        f.write(text_format.MessageToString(prototxt))
    net = caffe.Net(str(tmp_path / "edited.prototxt"), edited, caffe.TEST)
    assert "relu2" in net._layer_names and "relu1" not in net._layer_names
    np.testing.assert_array_equal(net.params["fc"][1].data, (new_fc[1] * 2).astype(np.float32))
    x = np.random.RandomState(2).randn(2, 3, 9, 8)
    net.blobs["data"].data[...] = x
    got = net.forward()["prob"]
    _, layers, _ = read_def(str(tmp_path / "edited.prototxt"))
    ref = forward(layers, dict(written, fc=[new_fc[0], new_fc[1] * 2]), x)
    np.testing.assert_allclose(got, ref["prob"], rtol=1e-4, atol=1e-6)


def test_v1_caffemodel_with_legacy_blob_dims(saved, tmp_path):
    """A caffemodel as Caffe before BlobShape wrote it: V1 ``layers`` with enum types and 4-D
    num/channels/height/width blobs, read with the V1 and with the upgraded prototxt."""
    proto, _, _ = saved["V1"]
    rng = np.random.RandomState(5)
    weights = {"conv1": [rng.randn(4, 3, 3, 3), rng.randn(4)], "fc": [rng.randn(5, 24), rng.randn(5)]}
    old = pb.NetParameter(name="tinyv1")
    for name, kind in (("conv1", "CONVOLUTION"), ("relu1", "RELU"), ("fc", "INNER_PRODUCT")):
        layer = old.layers.add(name=name, type=pb.V1LayerParameter.LayerType.Value(kind))
        for a in weights.get(name, []):
            n, c, h, w = (1,) * (4 - a.ndim) + a.shape
            layer.blobs.add(num=n, channels=c, height=h, width=w, data=a.ravel())
    model = str(tmp_path / "legacy.caffemodel")
    with open(model, "wb") as f:
        f.write(old.SerializeToString())
    read = _params_from_caffemodel(model)
    assert [a.shape for a in read["fc"]] == [(1, 1, 5, 24), (1, 1, 1, 5)]
    assert not old.layers[0].blobs[0].HasField("shape") and old.layers[0].blobs[0].HasField("num")
    net = caffe.Net(proto, model, caffe.TEST)
    assert [b.data.shape for b in net.params["fc"]] == [(5, 24), (5,)]
    x = rng.randn(2, 3, 9, 8)
    net.blobs["data"].data[...] = x
    got = net.forward()["prob"]
    _, layers, _ = read_def(proto)
    np.testing.assert_allclose(got, forward(layers, weights, x)["prob"], rtol=1e-4, atol=1e-6)
    resaved = str(tmp_path / "resaved.caffemodel")
    net.save(resaved)                   # Caffe writes the upgraded net: layer, shape.dim
    new = pb.NetParameter.FromString(open(resaved, "rb").read())
    assert not new.layers and [lr.type for lr in new.layer][:2] == ["Input", "Convolution"]
    conv = new.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert [list(b.shape.dim) for b in conv.blobs] == [[4, 3, 3, 3], [4]]
    assert not conv.blobs[0].HasField("num")


def test_summarize_table_and_draw_net(saved, tmp_path):
    """tools/extra/summarize.py's columns and python/draw_net.py's call."""
    proto = saved["NEW"][0]
    net = pb.NetParameter()
    with open(proto) as f:
        text_format.Parse(f.read(), net)
    rows = {}
    for lr in net.layer:
        conv = lr.convolution_param
        arg = ""
        if lr.type == "Convolution" and len(conv.kernel_size) == 1:
            arg = str(conv.kernel_size[0])
        elif lr.type == "Pooling":
            arg = str(lr.pooling_param.kernel_size)
            if lr.pooling_param.stride != 1:
                arg += "/" + str(lr.pooling_param.stride)
        params = [" ".join(([p.name] if p.name else []) +
                           (["x{}".format(p.lr_mult)] if p.lr_mult != 1 else []) +
                           (["Dx{}".format(p.decay_mult)] if p.decay_mult != 1 else []))
                  for p in lr.param]
        rows[lr.name] = (lr.type, ", ".join(params), ", ".join(lr.bottom), arg)
    assert rows["conv1"] == ("Convolution", ", x2.0 Dx0.0", "data", "")
    assert rows["pool1"] == ("Pooling", "", "conv1", "2/2")
    assert rows["drop"][0] == "Dropout" and net.layer[6].include[0].phase == caffe.TRAIN
    pytest.importorskip("pydot")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz 'dot' not installed")
    from caffe import draw          # draw_net.py's `import caffe.draw`, bound here by name
    out = tmp_path / "net.png"
    draw.draw_net_to_file(net, str(out), "TB", caffe.TEST, True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
