"""pycaffe's Net, checked the way BVLC's python/caffe/test/test_net.py checks it: a DummyData
net with force_backward, partial forward/backward against numpy, names, save/load, and
the batched helpers (forward_all, forward_backward_all) with pycaffe's padding."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

import caffe_compat as caffe

NUM_OUTPUT = 13


def simple_net_text(num_output=NUM_OUTPUT, force_backward=True):
    return f"""name: 'testnet' force_backward: {str(force_backward).lower()}
    layer {{ type: 'DummyData' name: 'data' top: 'data' top: 'label'
      dummy_data_param {{ num: 5 channels: 2 height: 3 width: 4
        num: 5 channels: 1 height: 1 width: 1
        data_filler {{ type: 'gaussian' std: 1 }}
        data_filler {{ type: 'constant' }} }} }}
    layer {{ type: 'Convolution' name: 'conv' bottom: 'data' top: 'conv'
      convolution_param {{ num_output: 11 kernel_size: 2 pad: 3
        weight_filler {{ type: 'gaussian' std: 1 }}
        bias_filler {{ type: 'constant' value: 2 }} }}
        param {{ decay_mult: 1 }} param {{ decay_mult: 0 }} }}
    layer {{ type: 'InnerProduct' name: 'ip' bottom: 'conv' top: 'ip_blob'
      inner_product_param {{ num_output: {num_output}
        weight_filler {{ type: 'gaussian' std: 2.5 }}
        bias_filler {{ type: 'constant' value: -3 }} }} }}
    layer {{ type: 'SoftmaxWithLoss' name: 'loss' bottom: 'ip_blob' bottom: 'label'
      top: 'loss' }}"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(simple_net_text())
    return str(path)


@pytest.fixture
def net(net_file):
    n = caffe.Net(net_file, caffe.TRAIN)
    n.blobs["label"].data[...] = np.random.RandomState(0).randint(
        NUM_OUTPUT, size=n.blobs["label"].data.shape)
    return n


def test_blob_memory_outlives_the_net(net):
    params = sum(map(list, net.params.values()), [])
    blobs = list(net.blobs.values())
    del net
    total = sum(p.data.sum() + p.diff.sum() for p in params)
    total += sum(b.data.sum() + b.diff.sum() for b in blobs)
    assert np.isfinite(total)


def test_layer_dict(net):
    assert list(net.layer_dict) == list(net._layer_names)
    for i, name in enumerate(net._layer_names):
        assert net.layer_dict[name].type == net.layers[i].type


def test_constant_dummy_tops_keep_labels_written_from_python(net):
    labels = net.blobs["label"].data.copy()
    data_before = net.blobs["data"].data.copy()
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data, labels)      # filled once
    assert not np.array_equal(net.blobs["data"].data, data_before)     # gaussian: refilled
    expected = _softmax_loss(net.blobs["ip_blob"].data, labels)
    np.testing.assert_allclose(net.blobs["loss"].data, expected, rtol=1e-5)


def _softmax_loss(scores, labels):
    s = scores.astype(np.float64)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    picked = p[np.arange(len(s)), labels.reshape(-1).astype(int)]
    return -np.log(np.maximum(picked, np.finfo(np.float32).tiny)).mean()   # Caffe's FLT_MIN


def test_forward_backward_and_clear_param_diffs(net):
    net.forward()
    net.backward()
    diff = net.params["conv"][0].diff
    assert diff.max() > 0
    net.clear_param_diffs()
    assert (diff == 0).all()


def test_forward_start_end_uses_data_set_by_hand(net):
    conv = net.blobs["conv"]
    conv.data[:] = np.random.RandomState(1).uniform(size=conv.data.shape).astype(np.float32)
    out = net.forward(start="ip", end="ip")
    assert set(out) == {"ip_blob"}
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    manual = np.array([w @ conv.data[i].reshape(-1) + b for i in range(conv.shape[0])])
    np.testing.assert_allclose(net.blobs["ip_blob"].data, manual, rtol=1e-3, atol=1e-5)


def test_backward_start_end_before_any_forward(net):
    conv, ip = net.blobs["conv"], net.blobs["ip_blob"]
    sample = np.random.RandomState(2).uniform(size=ip.data.shape).astype(np.float32)
    ip.diff[:] = sample
    out = net.backward(start="ip", end="ip")
    assert set(out) == {"conv"}
    w = net.params["ip"][0].data
    manual = np.array([w.T @ sample[i] for i in range(conv.shape[0])]).reshape(conv.shape)
    np.testing.assert_allclose(conv.diff, manual, rtol=1e-3, atol=1e-5)
    assert not net.blobs["data"].diff.any()          # layers before 'ip' did not run


def test_backward_from_a_middle_layer_uses_the_diff_set_there(net):
    """DeepDream's pattern: set an intermediate blob's diff, backward(start=that layer)."""
    net.forward()
    g = np.random.RandomState(3).normal(size=net.blobs["conv"].shape).astype(np.float32)
    net.blobs["conv"].diff[...] = g
    grads = net.backward(start="conv", diffs=["data"])
    assert set(grads) == {"data"}
    w = net.params["conv"][0].data.astype(np.float64)
    # conv with pad 3, kernel 2: d data = full correlation of g with the flipped kernel
    x = net.blobs["data"].data.astype(np.float64)
    expected = np.zeros_like(x)
    pad = np.zeros((x.shape[0], x.shape[1], x.shape[2] + 6, x.shape[3] + 6))
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            for i in range(g.shape[2]):
                for j in range(g.shape[3]):
                    pad[n, :, i:i + 2, j:j + 2] += g[n, o, i, j] * w[o]
    expected = pad[:, :, 3:-3, 3:-3]
    np.testing.assert_allclose(grads["data"], expected, rtol=1e-4, atol=1e-5)


def test_no_backward_without_loss_or_force_backward(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text("input: 'data' input_shape { dim: 2 dim: 3 }\n"
                    "layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip' "
                    "inner_product_param { num_output: 2 weight_filler { type: 'gaussian' } } }")
    net = caffe.Net(str(path), caffe.TEST)
    net.forward(data=np.ones((2, 3), np.float32))
    net.blobs["ip"].diff[...] = 1
    net.backward()
    assert not net.params["ip"][0].diff.any()        # Caffe: "ip does not need backward"


def test_inputs_outputs_and_names(net):
    assert net.inputs == [] and net.outputs == ["loss"]
    assert net.top_names == OrderedDict([("data", ["data", "label"]), ("conv", ["conv"]),
                                         ("ip", ["ip_blob"]), ("loss", ["loss"])])
    assert net.bottom_names == OrderedDict([("data", []), ("conv", ["data"]),
                                            ("ip", ["conv"]), ("loss", ["ip_blob", "label"])])


@pytest.mark.parametrize("save, load", [("save", "copy_from"), ("save_hdf5", "load_hdf5")])
def test_save_and_read(net, net_file, tmp_path, save, load):
    path = str(tmp_path / "weights")         # no extension, as BVLC's test's temp file
    getattr(net, save)(path)
    other = caffe.Net(net_file, caffe.TRAIN)
    getattr(other, load)(path)
    legacy = caffe.Net(net_file, path, caffe.TRAIN)
    for name in net.params:
        for i in range(len(net.params[name])):
            assert abs(net.params[name][i].data - other.params[name][i].data).sum() == 0
            assert abs(net.params[name][i].data - legacy.params[name][i].data).sum() == 0


DEPLOY = """input: 'data' input_shape { dim: 4 dim: 3 }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
        inner_product_param { num_output: 2 weight_filler { type: 'gaussian' } } }
layer { name: 'prob' type: 'Softmax' bottom: 'ip' top: 'prob' }
"""


def test_forward_all_batches_and_drops_padding(tmp_path):
    (tmp_path / "d.prototxt").write_text("force_backward: true\n" + DEPLOY)
    net = caffe.Net(str(tmp_path / "d.prototxt"), caffe.TEST)
    x = np.random.RandomState(4).normal(size=(10, 3)).astype(np.float32)   # 2 full + 2 padded
    batches = list(net._batch({"data": x}))
    assert [len(b["data"]) for b in batches] == [4, 4, 4]
    assert not batches[-1]["data"][2:].any()
    out = net.forward_all(data=x, blobs=["ip"])
    assert set(out) == {"prob", "ip"} and out["prob"].shape == (10, 2)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    np.testing.assert_allclose(out["ip"], x @ w.T + b, rtol=1e-5, atol=1e-6)
    e = np.exp(out["ip"] - out["ip"].max(1, keepdims=True))
    np.testing.assert_allclose(out["prob"], e / e.sum(1, keepdims=True), rtol=1e-5)
    blobs, diffs = net.forward_backward_all(data=x, prob=np.ones((10, 2), np.float32))
    assert blobs["prob"].shape == (10, 2) and diffs["data"].shape == (10, 3)
    # d(sum prob)/d anything = 0: softmax outputs sum to one
    np.testing.assert_allclose(diffs["data"], 0, atol=1e-5)


def test_forward_checks_inputs_like_pycaffe(tmp_path):
    (tmp_path / "d.prototxt").write_text(DEPLOY)
    net = caffe.Net(str(tmp_path / "d.prototxt"), caffe.TEST)
    with pytest.raises(ValueError, match="do not match"):
        net.forward(other=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="not batch sized"):
        net.forward(data=np.zeros((3, 3)))
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        net.forward(start="nope")


SMALL_CONV = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 2 kernel_size: 5 weight_filler { type: "gaussian" std: 1 } } }
"""


@pytest.mark.parametrize("blobs", [None, ["conv1"]])
def test_a_forward_on_input_shapes_the_net_cannot_take_names_the_layer(tmp_path, blobs):
    """An input blob reshaped smaller than a kernel, without net.reshape(): both forward
    paths failed with torch's kernel message, which names no layer (Caffe aborts here)."""
    (tmp_path / "s.prototxt").write_text(SMALL_CONV)
    net = caffe.Net(str(tmp_path / "s.prototxt"), caffe.TEST)
    net.blobs["data"].reshape(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"s\.prototxt: layer 'conv1' \(Convolution\): "
                                         r"output size \[0, 0\] is empty"):
        net.forward(blobs=blobs)
    net.blobs["data"].reshape(1, 1, 8, 8)
    assert net.forward()["conv1"].shape == (1, 2, 4, 4)


@pytest.mark.parametrize("level, blobs", [(0, ["NoLevel", "Level0Only", "Level>=0"]),
                                          (1, ["NoLevel", "Level1Only", "Level>=0", "Level>=1"])])
def test_levels(tmp_path, level, blobs):
    layers = [("NoLevel", ""), ("Level0Only", "include { min_level: 0 max_level: 0 }"),
              ("Level1Only", "include { min_level: 1 max_level: 1 }"),
              ("Level>=0", "include { min_level: 0 }"), ("Level>=1", "include { min_level: 1 }")]
    text = "layer { name: 'data' type: 'DummyData' top: 'data' dummy_data_param " \
           "{ shape { dim: 1 dim: 1 dim: 10 dim: 10 } } }\n"
    text += "".join(f"layer {{ name: '{n}' type: 'InnerProduct' bottom: 'data' top: '{n}' {r} "
                    "inner_product_param { num_output: 1 } }\n" for n, r in layers)
    (tmp_path / "l.prototxt").write_text(text)
    net = caffe.Net(str(tmp_path / "l.prototxt"), caffe.TEST, level=level)
    assert [b for b in net.blobs if "data" not in b] == blobs


def test_device_style_lazy_blobs_match_eager_ones(net_file):
    """The GPU path (results stay on the device until read) forced on the CPU: the same
    values as the eager path, and blobs nobody read were never copied to the host."""
    results = []
    for lazy in (False, True):
        caffe.set_random_seed(5)
        n = caffe.Net(net_file, caffe.TRAIN)
        n.blob_state.lazy = lazy
        n.blobs["label"].data[...] = np.arange(5).reshape(5, 1, 1, 1) % NUM_OUTPUT
        n.forward()
        if lazy:
            assert n.blob_state.pending("conv") == n.blob_state.pending("ip_blob") == {"data"}
            held = n.blobs["conv"].data                  # read: copied now, pending cleared
            assert not n.blob_state.pending("conv")
        n.backward()
        results.append(({k: b.data.copy() for k, b in n.blobs.items()},
                        {k: b.diff.copy() for k, b in n.blobs.items()},
                        {k: [p.diff.copy() for p in ps] for k, ps in n.params.items()}))
    (d0, g0, p0), (d1, g1, p1) = results
    for name in d0:
        np.testing.assert_array_equal(d0[name], d1[name])
        np.testing.assert_array_equal(g0[name], g1[name])
    for name in p0:
        for a, b in zip(p0[name], p1[name]):
            np.testing.assert_array_equal(a, b)
    assert held is not None


def test_writes_through_params_reach_a_double_net_as_on_a_gpu(tmp_path):
    """Parameters that are not CPU float32 (GPU, double) are read through host mirrors:
    edits made through ``net.params`` (FCN's surgery.interp, merge-BN scripts) must reach
    the next forward and the saved caffemodel, and untouched mirrors never overwrite."""
    path = tmp_path / "ip.prototxt"
    path.write_text('input: "data" input_shape { dim: 1 dim: 2 }\n'
                    'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                    'inner_product_param { num_output: 2 } }\n')
    net = caffe.Net(str(path), caffe.TEST)
    net.module.double()
    net.params["ip"][0].data[...] = [[1, 2], [3, 4]]
    net.params["ip"][1].data[1] = 10            # a second ParamBlob of another blob
    assert net.params["ip"][0].data[1, 0] == 3  # a new ParamBlob sees the same mirror
    out = net.forward(data=np.ones((1, 2)))["ip"]
    np.testing.assert_array_equal(out, [[3, 17]])
    net.save(str(tmp_path / "w.caffemodel"))
    again = caffe.Net(str(path), str(tmp_path / "w.caffemodel"), caffe.TEST)
    np.testing.assert_array_equal(again.params["ip"][0].data, [[1, 2], [3, 4]])
    seen = net.params["ip"][0].data.copy()      # a read-only mirror ...
    with torch.no_grad():
        net.module.layers[1].blobs[0].add_(1)   # ... the engine changes the weights ...
    net.forward(data=np.ones((1, 2)))           # ... and the clean mirror is not written back
    np.testing.assert_array_equal(net.params["ip"][0].data, seen + 1)


def test_an_edited_double_weight_reaches_the_fused_forward(tmp_path):
    path = tmp_path / "ip.prototxt"
    path.write_text('input: "data" input_shape { dim: 1 dim: 2 }\n'
                    'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                    'inner_product_param { num_output: 1 bias_term: false } }\n')
    net = caffe.Net(str(path), caffe.TEST)
    net.module.double()
    for value in (1.0, 2.0):
        net.params["ip"][0].data[...] = value
        np.testing.assert_array_equal(net.forward(data=np.ones((1, 2)))["ip"], [[2 * value]])


def test_set_input_arrays_feeds_the_first_memory_data_layer(tmp_path):
    """pycaffe's Net.set_input_arrays(data, labels): the first layer must be MemoryData;
    1-D labels are accepted (pycaffe makes them N x 1 x 1 x 1); forwards walk the batches."""
    path = tmp_path / "mem.prototxt"
    path.write_text("""name: 'mem'
    layer { type: 'MemoryData' name: 'data' top: 'data' top: 'label'
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
    layer { type: 'Power' name: 'double' bottom: 'data' top: 'twice'
      power_param { scale: 2 } }""")
    net = caffe.Net(str(path), caffe.TEST)
    data = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    labels = np.array([5, 6, 7, 8], dtype=np.float32)
    net.set_input_arrays(data, labels)
    first = net.forward()
    np.testing.assert_array_equal(first["twice"], 2 * data[:2])
    np.testing.assert_array_equal(net.blobs["label"].data, [5, 6])
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[2:])
    net.set_input_arrays(data[:2], labels[:2, None, None, None])
    np.testing.assert_array_equal(net.forward()["twice"], 2 * data[:2])
    with pytest.raises(ValueError, match="MemoryData"):
        caffe.Net(simple_net_file(tmp_path), caffe.TEST).set_input_arrays(data, labels)


def simple_net_file(tmp_path):
    path = tmp_path / "simple.prototxt"
    path.write_text(simple_net_text())
    return str(path)


def test_extension_level_index_api(net):
    """_caffe.cpp's Net members that layer-dump and pruning scripts call directly:
    _blobs (by blob index), _top_ids(i) / _bottom_ids(i), _blob_loss_weights, and
    _forward(start, end) / _backward(start, end) over layer indices (_forward returns
    the loss of the layers run)."""
    names = list(net._blob_names)
    assert [b.shape for b in net._blobs] == [net.blobs[n].shape for n in names]
    for i, layer in enumerate(net._layer_names):
        assert [names[j] for j in net._top_ids(i)] == net.top_names[layer]
        assert [names[j] for j in net._bottom_ids(i)] == net.bottom_names[layer]
    assert isinstance(net._top_ids(1), caffe._caffe.IntVec)
    assert list(net._blob_loss_weights) == [1.0 if n == "loss" else 0.0 for n in names]
    last = len(net.layers) - 1
    loss = net._forward(0, last)
    assert isinstance(loss, float) and loss == float(net.blobs["loss"].data)
    net._blobs[names.index("conv")].data[...] = 0.5
    assert net._forward(2, 2) == 0.0                   # no loss top among layer 2's
    np.testing.assert_allclose(net.blobs["ip_blob"].data,
                               net.forward(start="ip", end="ip")["ip_blob"])
    net._forward(0, last)
    net._backward(last, 0)
    via_api = net.params["conv"][0].diff.copy()
    net.clear_param_diffs()
    net.backward()
    np.testing.assert_allclose(via_api, net.params["conv"][0].diff, rtol=1e-6)
