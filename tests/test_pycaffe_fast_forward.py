"""pycaffe's outputs-only fast forward: the fused net's outputs, every other blob on demand.

Each case compares with a second Net built from the same weights whose fast path is off (the
layer-by-layer path the rest of the pycaffe tests check against Caffe's goldens).
"""
from __future__ import annotations

import numpy as np
import pytest

import caffe_compat as caffe

NET = """
name: "bn"
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
input: "label" input_shape { dim: 2 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.fixture
def nets(tmp_path):
    """(fast net, reference net with the fast path off), equal weights, BN statistics set."""
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.default_rng(0)
    net.params["bn1"][0].data[...] = rng.random(4)
    net.params["bn1"][1].data[...] = rng.random(4) + 0.5
    net.params["bn1"][2].data[...] = 0.8          # moving-average factor: stats / 0.8
    net.params["sc1"][0].data[...] = rng.random(4) + 0.5
    net.params["sc1"][1].data[...] = rng.random(4) - 0.5
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    ref = caffe.Net(str(path), str(weights), caffe.TEST)
    ref._fast = None
    return net, ref, rng


def _feed(rng):
    return {"data": rng.random((2, 3, 8, 8)).astype(np.float32),
            "label": np.array([0, 2], np.float32)}


def _outputs(net, feed):
    return {k: v.copy() for k, v in net.forward(**feed).items()}


def test_takes_the_fused_path_and_matches_the_layer_path(nets):
    net, ref, rng = nets
    assert net._fast is not None
    feed = _feed(rng)
    ours, theirs = _outputs(net, feed), _outputs(ref, feed)
    assert net.blob_state.is_stale("fc")                 # not copied: stale until read
    for name in ("prob", "loss"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_intermediate_blobs_read_as_the_full_forward_left_them(nets):
    net, ref, rng = nets
    feed = _feed(rng)
    net.forward(**feed)
    ref.forward(**feed)
    net.blobs["data"].data[...] = 0          # changed after the forward: Caffe's blobs keep
    for name in ("conv1", "fc"):             # what that forward computed
        np.testing.assert_array_equal(net.blobs[name].data, ref.blobs[name].data)
    assert net.blobs["conv1"].shape == ref.blobs["conv1"].shape
    np.testing.assert_array_equal(net.blobs["data"].data, 0)   # the caller's write stays


def test_blobs_read_after_a_weight_edit_keep_the_forwards_weights(nets):
    """Caffe's blobs hold what the forward computed; a weight written through net.params
    before a stale blob was first read made the recompute use the new weights."""
    net, ref, rng = nets
    feed = _feed(rng)
    net.forward(**feed)
    ref.forward(**feed)
    net.params["conv1"][0].data[...] = 0.0
    net.params["sc1"][1].data[...] += 1.0
    for name in ("conv1", "fc"):
        np.testing.assert_array_equal(net.blobs[name].data, ref.blobs[name].data)
    ref.params["conv1"][0].data[...] = 0.0         # the next forward sees the edit
    ref.params["sc1"][1].data[...] += 1.0
    np.testing.assert_allclose(_outputs(net, feed)["prob"], _outputs(ref, feed)["prob"],
                               rtol=1e-5, atol=1e-6)


def test_blobs_read_after_a_write_through_a_held_view_keep_the_forwards_weights(nets):
    """The same with views taken before the forward and written after it: no hand-out
    happens between the forward and the read, so the write itself is what must not reach
    the stale blobs' recompute."""
    net, ref, rng = nets
    weight, bias = net.params["conv1"][0].data, net.params["sc1"][1].data
    feed = _feed(rng)
    net.forward(**feed)
    ref.forward(**feed)
    weight[...] = 0.0
    bias += 1.0
    for name in ("conv1", "fc"):
        np.testing.assert_array_equal(net.blobs[name].data, ref.blobs[name].data)
    np.testing.assert_array_equal(net.params["conv1"][0].data, 0.0)    # the edit stays
    ref.params["conv1"][0].data[...] = 0.0
    ref.params["sc1"][1].data[...] += 1.0
    np.testing.assert_allclose(_outputs(net, feed)["prob"], _outputs(ref, feed)["prob"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["temporary", "held", "released"])
def test_weights_written_through_numpy_reach_the_next_forward(nets, how):
    """``released``: a view alive during a forward, written after it and dropped before the
    next one (the fused net of that forward had been made while it was alive)."""
    net, ref, rng = nets
    feed = _feed(rng)
    net.forward(**feed)                               # fused with the old weights
    if how == "temporary":
        net.params["sc1"][0].data[...] = 3.0
        ref.params["sc1"][0].data[...] = 3.0
    else:
        held = net.params["bn1"][0].data             # held across a forward, written after
        net.forward(**feed)
        held += 2.0
        ref.params["bn1"][0].data[...] += 2.0
        if how == "released":
            del held
    np.testing.assert_allclose(_outputs(net, feed)["prob"], _outputs(ref, feed)["prob"],
                               rtol=1e-5, atol=1e-6)


def test_a_held_weight_view_left_unwritten_keeps_the_fused_net(nets):
    """The classification notebook keeps ``filters = net.params['conv1'][0].data`` alive:
    while the view is not written, forwards reuse the fused net (re-fusing on every call
    made an MTCNN O-Net's forward 7x slower); a write through it reaches the next forward."""
    net, ref, rng = nets
    feed = _feed(rng)
    filters = net.params["conv1"][0].data
    net.forward(**feed)
    fused = net._fast.cache._fused
    net.forward(**feed)
    assert net._fast.cache._fused is fused
    filters *= -1.0
    ref.params["conv1"][0].data[...] *= -1.0
    np.testing.assert_allclose(_outputs(net, feed)["prob"], _outputs(ref, feed)["prob"],
                               rtol=1e-5, atol=1e-6)
    assert net._fast.cache._fused is not fused


def test_reading_the_weights_between_forwards_keeps_the_fused_net(nets, monkeypatch):
    """A hand-out that only reads (visualising filters between forwards) leaves the fused
    net as it is; a write through the next hand-out still reaches the next forward. A net
    too large to keep a copy of its values re-fuses at every hand-out, as before."""
    from caffe_compat._pycaffe import fast, param_reference
    net, ref, rng = nets
    feed = _feed(rng)
    net.forward(**feed)
    fused = net._fast.cache._fused
    for _ in range(3):
        assert float(net.params["conv1"][0].data.sum()) != 0.0        # a read
        net.forward(**feed)
    assert net._fast.cache._fused is fused
    net.params["sc1"][1].data[...] += 0.25                                # a write
    ref.params["sc1"][1].data[...] += 0.25
    np.testing.assert_allclose(_outputs(net, feed)["prob"], _outputs(ref, feed)["prob"],
                               rtol=1e-5, atol=1e-6)
    assert net._fast.cache._fused is not fused
    monkeypatch.setattr(param_reference, "REFERENCE_VALUES", 0)   # too large to copy
    net.params["sc1"][1].data[...] -= 0.25             # a write: re-fused, no copy kept
    net.forward(**feed)
    fused = net._fast.cache._fused
    net.params["conv1"][0].data.sum()
    net.forward(**feed)
    assert net._fast.cache._fused is not fused


def test_numpy_hand_outs_are_counted_off_the_torch_parameters(nets):
    """The generation counter lives in the fast path's registry: nothing is written onto
    the torch Parameter, and each hand-out of a view bumps its parameter's generation."""
    from caffe_compat._pycaffe.param_views import PARAM_VIEWS
    net, _, rng = nets
    param = net.module.layer_by_name("sc1").blobs[0]
    before = dict(vars(param))
    (generation,), _ = PARAM_VIEWS.state([param])
    view = net.params["sc1"][0].data
    assert PARAM_VIEWS.state([param]) == ((generation + 1,), True)
    del view
    assert PARAM_VIEWS.state([param]) == ((generation + 1,), False)
    assert vars(param) == before


def test_backward_after_a_fast_forward_sees_the_full_forward(nets):
    net, ref, rng = nets
    feed = _feed(rng)
    for n in (net, ref):
        n.forward(**feed)
        n.clear_param_diffs()
        n.backward()
    for layer in ("conv1", "fc"):
        np.testing.assert_allclose(net.params[layer][0].diff, ref.params[layer][0].diff,
                                   rtol=1e-5, atol=1e-7)
    assert np.abs(net.params["conv1"][0].diff).sum() > 0


def test_partial_forward_after_a_fast_forward_reads_its_blobs(nets):
    net, ref, rng = nets
    feed = _feed(rng)
    net.forward(**feed)
    ref.forward(**feed)
    net.blobs["conv1"].data  # noqa: B018 - nothing read yet on ref either way
    for n in (net, ref):
        n.forward(start="fc", end="prob")
    np.testing.assert_allclose(net.blobs["prob"].data, ref.blobs["prob"].data, rtol=1e-6)


def test_blobs_argument_takes_the_full_path(nets):
    net, _, rng = nets
    out = net.forward(blobs=["conv1"], **_feed(rng))
    assert not net.blob_state.is_stale("fc") and out["conv1"].shape == (2, 4, 6, 6)


def test_nets_with_data_layers_or_python_layers_keep_the_full_path(tmp_path):
    path = tmp_path / "dummy.prototxt"
    path.write_text('layer { name: "d" type: "DummyData" top: "x" dummy_data_param {'
                    ' shape { dim: 1 dim: 2 } data_filler { type: "constant" value: 1 } } }\n'
                    'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n')
    assert caffe.Net(str(path), caffe.TEST)._fast is None
    trained = tmp_path / "train.prototxt"
    trained.write_text('input: "x" input_shape { dim: 1 dim: 2 }\n'
                       'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n')
    assert caffe.Net(str(trained), caffe.TRAIN)._fast is None
    sink = tmp_path / "sink.prototxt"
    sink.write_text('input: "x" input_shape { dim: 1 dim: 2 }\n'
                    'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n'
                    'layer { name: "s" type: "Silence" bottom: "y" }\n')
    assert caffe.Net(str(sink), caffe.TEST)._fast is None      # sinks act on every forward


def test_a_net_sampling_dropout_at_test_reads_its_blobs_from_one_draw(tmp_path):
    """Bayesian SegNet's ``sample_weights_test``: each forward draws new masks. An inner blob
    read after the forward holds the masked values its outputs were computed from, as in
    Caffe; a recompute on the read would have drawn other masks."""
    path = tmp_path / "mc.prototxt"
    path.write_text('input: "data" input_shape { dim: 2 dim: 50 }\n'
                    'layer { name: "drop" type: "Dropout" bottom: "data" top: "d" '
                    'dropout_param { dropout_ratio: 0.5 sample_weights_test: true } }\n'
                    'layer { name: "ip" type: "InnerProduct" bottom: "d" top: "out" '
                    'inner_product_param { num_output: 3 '
                    'weight_filler { type: "gaussian" std: 0.5 } } }\n')
    net = caffe.Net(str(path), caffe.TEST)
    out = net.forward(data=np.ones((2, 50), np.float32))["out"].copy()
    d = net.blobs["d"].data.astype(np.float64)
    assert set(np.unique(d)) == {0.0, 2.0}                     # a mask was drawn
    w, b = (p.data.astype(np.float64) for p in net.params["ip"])
    np.testing.assert_allclose(out, d @ w.T + b, rtol=1e-5, atol=1e-5)


def test_a_numpy_write_restoring_values_after_a_torch_write_is_seen(nets):
    """The fused net follows a torch write (its version moves); a numpy write that then puts
    the old values back is a change too, though they equal the copy taken before."""
    import torch
    net, ref, rng = nets
    feed = _feed(rng)
    original = net.params["sc1"][0].data.copy()
    net.forward(**feed)
    with torch.no_grad():
        net.module.layer_by_name("sc1").blobs[0].mul_(2.0)            # a torch write
    net.forward(**feed)
    net.params["sc1"][0].data[...] = original                         # numpy: back to before
    np.testing.assert_allclose(_outputs(net, feed)["prob"], _outputs(ref, feed)["prob"],
                               rtol=1e-5, atol=1e-6)
