"""One BlobState per pycaffe Net says where each blob's values are (host, pending, stale).

The transitions a script sees -- a fast forward leaves the inner blobs stale and the first
read recomputes them; a value left pending on its device is copied in when read, a numpy
write to it then stands, and the next forward reads the written value -- are tracked by the
net's ``blob_state`` alone: the Blob views and the torch parameters carry nothing. Values
are checked against the closed form in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat._pycaffe.state import BlobState

NET = """
name: "mlp"
input: "data" input_shape { dim: 2 dim: 5 }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "r1" }
layer { name: "ip2" type: "InnerProduct" bottom: "r1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "mlp.prototxt"
    path.write_text(NET)
    caffe.set_random_seed(3)
    return caffe.Net(str(path), caffe.TEST)


def _weights(net, layer):
    w, b = (p.data.astype(np.float64) for p in net.params[layer])
    return w, b


def _ip1(net, x):
    w, b = _weights(net, "ip1")
    return x.astype(np.float64) @ w.T + b


def _prob_from_ip1(net, ip1):
    w, b = _weights(net, "ip2")
    z = np.maximum(ip1, 0) @ w.T + b
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _snapshot(net):
    """Every attribute of every Blob view and of every parameter tensor."""
    blobs = {name: dict(vars(blob)) for name, blob in net.blobs.items()}
    params = [dict(vars(p)) for p in net.module.parameters()]
    return blobs, params


def test_fast_forward_marks_stale_and_a_read_recomputes(net):
    assert net.engine == "torch" and net.blob_state.lazy is False
    x = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    before = _snapshot(net)
    out = net.forward(data=x)
    state = net.blob_state
    assert {n for n in net.blobs if state.is_stale(n)} == {"ip1", "r1", "ip2"}
    assert not state.is_stale("data") and not state.is_stale("prob")
    np.testing.assert_allclose(out["prob"], _prob_from_ip1(net, _ip1(net, x)), rtol=1e-5)
    assert _snapshot(net) == before             # nothing was written on views or tensors

    ip1 = net.blobs["ip1"].data                 # the first read recomputes every stale blob
    assert not any(state.is_stale(n) for n in net.blobs)
    np.testing.assert_allclose(ip1, _ip1(net, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["r1"].data, np.maximum(_ip1(net, x), 0),
                               rtol=1e-5, atol=1e-6)
    assert _snapshot(net) == before

    net.forward(data=x)                         # stale again until read
    assert state.is_stale("ip2")
    net.blob_state.clear_stale()                # a full forward follows: no recompute
    assert not state.is_stale("ip2")


def test_pending_value_then_numpy_write_reaches_the_next_forward(net):
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    net.blob_state.lazy = True                  # results stay on their device until read
    held = net.blobs["ip1"].data                # fetched before the forward: zeros
    before = _snapshot(net)
    net.blobs["data"].data[...] = x
    net.forward(start="ip1")                    # layer by layer
    state = net.blob_state
    assert state.pending("ip1") == state.pending("ip2") == {"data"}   # prob: returned, read
    assert not held.any()                       # not copied yet: pending
    assert _snapshot(net) == before

    np.testing.assert_allclose(net.blobs["ip1"].data, _ip1(net, x), rtol=1e-5, atol=1e-6)
    assert state.pending("ip1") == set()        # read: copied in, into the held array
    np.testing.assert_allclose(held, _ip1(net, x), rtol=1e-5, atol=1e-6)

    written = np.array([[1.0, -2.0, 3.0, 0.5], [-1.0, 2.0, 0.0, 4.0]], np.float32)
    net.blobs["ip1"].data[...] = written        # a numpy write to the host array
    net.forward(start="relu1")                  # reads ip1 from the host: the write
    np.testing.assert_allclose(net.blobs["prob"].data, _prob_from_ip1(net, written),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["ip1"].data, written)
    assert _snapshot(net) == before


def test_reshape_after_a_fast_forward_at_another_batch(net):
    """``net.reshape()`` reads the blobs a fast forward left stale while it reshapes them;
    the recompute ran the old batch's inputs through the already reshaped input blob
    (a broadcast error). Now the stale blobs keep the last forward's values (Caffe keeps a
    blob's values when its count is unchanged) and the next forward uses the new shape."""
    x = np.arange(15, dtype=np.float32).reshape(3, 5) / 15
    net.blobs["data"].reshape(3, 5)
    net.reshape()
    net.forward(data=x)
    w, b = _weights(net, "ip1")
    net.blobs["data"].reshape(3, 5)               # same shape: the inner values stand
    net.reshape()
    np.testing.assert_allclose(net.blobs["ip1"].data, x @ w.T + b, rtol=1e-5)
    net.blobs["data"].reshape(1, 5)
    net.reshape()
    assert net.blobs["ip1"].data.shape == (1, 4)
    out = net.forward(data=x[:1])["prob"]
    assert out.shape == (1, 3)
    np.testing.assert_allclose(net.blobs["ip1"].data, x[:1] @ w.T + b, rtol=1e-5)


def test_a_reshape_to_another_count_runs_nothing_and_zeroes_the_stale_blobs(net,
                                                                            monkeypatch):
    """An image pyramid reshapes the input at every scale. Each ``net.reshape()`` after a
    fast forward recomputed the stale blobs, the whole net layer by layer, only to reshape
    them (5.8x the cost of an MTCNN folder's forwards here). Where every stale blob's count
    changes nothing of its values could survive: it gets zeros of the new shape, as any blob
    whose count changes does, and the recompute is dropped."""
    from caffe_compat._pycaffe import layerwise
    ran = []
    real = layerwise.forward_range
    monkeypatch.setattr(layerwise, "forward_range",
                        lambda *a, **k: (ran.append(a[1:3]), real(*a, **k))[1])
    x = np.random.default_rng(4).random((3, 5), dtype=np.float32)
    net.blobs["data"].reshape(3, 5)
    net.reshape()
    net.forward(data=x)
    for batch in (1, 4):
        net.blobs["data"].reshape(batch, 5)
        net.reshape()
        assert ran == []
        assert net.blobs["ip1"].data.shape == (batch, 4) and not net.blobs["ip1"].data.any()
        assert net.blobs["r1"].diff.shape == (batch, 4)
    w, b = _weights(net, "ip1")
    net.forward(data=x[:1].repeat(4, axis=0))
    np.testing.assert_allclose(net.blobs["ip1"].data[3], x[0] @ w.T + b, rtol=1e-5)


def test_a_reshape_keeping_a_stale_blobs_count_keeps_its_values(tmp_path):
    """Caffe keeps a blob's memory when its count is unchanged: an image turned on its
    side (8x6 after 6x8) leaves each inner blob the last forward's values, reshaped, which
    the recompute gives it."""
    path = tmp_path / "conv.prototxt"
    path.write_text('name: "c" input: "data" input_shape { dim: 1 dim: 1 dim: 6 dim: 8 }\n'
                    'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"\n'
                    '  convolution_param { num_output: 2 kernel_size: 1\n'
                    '    weight_filler { type: "gaussian" std: 1 } } }\n'
                    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "r" }\n')
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.default_rng(5).random((1, 1, 6, 8), dtype=np.float32)
    net.forward(data=x)
    w, b = (p.data.astype(np.float64) for p in net.params["conv"])
    want = (w.reshape(1, 2, 1, 1) * x + b.reshape(1, 2, 1, 1)).reshape(1, 2, 8, 6)
    net.blobs["data"].reshape(1, 1, 8, 6)
    net.reshape()
    np.testing.assert_allclose(net.blobs["conv"].data, want, rtol=1e-5, atol=1e-6)


def test_reading_a_stale_blob_leaves_the_outputs_and_inputs_as_they_are(net):
    """A read that recomputes the stale blobs changes no blob the fast forward wrote: an
    output array the caller edited in place keeps the edit (Caffe runs nothing on a read),
    and an input blob reshaped since keeps the very array a script holds and writes."""
    x = np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32)
    out = net.forward(data=x)["prob"]
    out[...] = 7.0                              # post-processed in place by the caller
    net.blobs["ip1"].data                       # recomputes the stale blobs
    assert net.blobs["prob"].data is out
    np.testing.assert_array_equal(out, np.full((2, 3), 7.0, np.float32))

    net.forward(data=x)                         # stale again
    net.blobs["data"].reshape(1, 5)
    held = net.blobs["data"].data
    net.reshape()                               # reads (recomputes) the stale blobs
    held[...] = x[:1]                           # the script fills the array it holds
    got = net.forward()["prob"]
    np.testing.assert_allclose(got, _prob_from_ip1(net, _ip1(net, x[:1])), rtol=1e-5)


@pytest.mark.parametrize("how", ["forward", "_forward"])
def test_forward_up_to_a_layer_after_a_fast_forward_keeps_the_later_blobs(net, how):
    """``forward(end=...)`` (or the index form ``_forward(0, i)``) from the first layer
    recomputes up to ``end``; the blobs after it hold the last full forward's values, as in
    Caffe (they were stale, not fresh)."""
    rng = np.random.default_rng(3)
    x1, x2 = (rng.standard_normal((2, 5)).astype(np.float32) + 2 for _ in range(2))
    net.forward(data=x1)
    net.blobs["ip2"].data                       # ip2 of x1 on the host
    net.forward(data=x2)
    if how == "forward":
        net.forward(end="ip1")
    else:
        net._forward(0, list(net._layer_names).index("ip1"))
    np.testing.assert_allclose(net.blobs["prob"].data, _prob_from_ip1(net, _ip1(net, x2)),
                               rtol=1e-5)
    w, b = _weights(net, "ip2")
    np.testing.assert_allclose(net.blobs["ip2"].data,
                               np.maximum(_ip1(net, x2), 0) @ w.T + b, rtol=1e-5, atol=1e-6)


def test_layer_callbacks_run_on_a_plain_forward_and_not_on_a_read(net):
    """``net.after_forward(fn)`` (Caffe's Net::add_after_forward) sees every layer of each
    ``forward()``, on a net that would take the outputs-only path too; a later read of a
    blob runs no callback."""
    x = np.random.default_rng(4).standard_normal((2, 5)).astype(np.float32)
    net.forward(data=x)                         # stale blobs, then a callback is added
    seen = []
    net.after_forward(seen.append)
    net.blobs["ip1"].data
    assert seen == []
    net.forward(data=x)
    assert seen == list(range(len(net.layers)))
    np.testing.assert_allclose(net.blobs["ip1"].data, _ip1(net, x), rtol=1e-5, atol=1e-6)


def test_reshape_to_the_shapes_of_the_last_forward_leaves_its_blobs_stale(net):
    """``net.reshape()`` at the input shapes the last fast forward ran at changes no blob's
    shape: the skipped blobs stay stale (reading them all there cost a full forward on
    every call of a script that reshapes before each forward) and read the same later."""
    x = np.random.default_rng(5).standard_normal((2, 5)).astype(np.float32) + 1
    out = net.forward(data=x)["prob"].copy()
    net.blobs["data"].reshape(2, 5)
    net.reshape()
    assert net.blob_state.is_stale("ip1") and net.blob_state.is_stale("ip2")
    np.testing.assert_allclose(net.blobs["ip1"].data, _ip1(net, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["prob"].data, out)


FAST_RCNN_HEAD = """
input: 'data' input_shape { dim: 1 dim: 2 dim: 8 dim: 8 }
input: 'rois' input_shape { dim: 2 dim: 5 }
layer { name: 'pool5' type: 'ROIPooling' bottom: 'data' bottom: 'rois' top: 'pool5'
        roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 1.0 } }
layer { name: 'cls_score' type: 'InnerProduct' bottom: 'pool5' top: 'cls_score'
        inner_product_param { num_output: 3 weight_filler { type: 'gaussian' std: 1 } } }
layer { name: 'cls_prob' type: 'Softmax' bottom: 'cls_score' top: 'cls_prob' }
"""


@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_a_blob_reshaped_to_zero_rows_runs_as_in_caffe(tmp_path, engine):
    """Caffe's Blob::Reshape takes zero dims: py-faster-rcnn's im_detect reshapes 'rois' to
    the image's proposals, none for an image without any. The forward then gives zero-row
    outputs, and the next image's rows are computed as usual (checked in float64)."""
    path = tmp_path / "head.prototxt"
    path.write_text(FAST_RCNN_HEAD)
    net = caffe.Net(str(path), caffe.TEST, engine=engine)
    image = np.arange(128, dtype=np.float32).reshape(1, 2, 8, 8)
    net.blobs["data"].data[...] = image
    w = net.params["cls_score"][0].data.astype(np.float64)
    b = net.params["cls_score"][1].data.astype(np.float64)
    for rows in ([], [[0, 0, 0, 3, 3]], [], [[0, 4, 4, 7, 7], [0, 0, 0, 7, 7]]):
        rois = np.array(rows, np.float32).reshape(-1, 5)
        net.blobs["rois"].reshape(*rois.shape)
        net.blobs["rois"].data[...] = rois
        out = net.forward()
        assert out["cls_prob"].shape == (len(rows), 3)
        assert net.blobs["pool5"].data.shape == (len(rows), 2, 2, 2)
        for i, (_, x1, y1, x2, y2) in enumerate(rows):
            # ROI max pooling of the bins [y1, y1+h/2) x [x1, x1+w/2) ... (integer boxes)
            box = image[0, :, y1:y2 + 1, x1:x2 + 1].astype(np.float64)
            hh, ww = box.shape[1] // 2, box.shape[2] // 2
            pooled = np.array([[[box[c, :hh, :ww].max(), box[c, :hh, ww:].max()],
                                [box[c, hh:, :ww].max(), box[c, hh:, ww:].max()]]
                               for c in range(2)])
            score = w @ pooled.reshape(-1) + b
            prob = np.exp(score - score.max()) / np.exp(score - score.max()).sum()
            np.testing.assert_allclose(out["cls_prob"][i], prob, rtol=1e-5, atol=1e-6)


def test_a_parameter_reshape_keeps_or_zeroes_values_as_caffes_buffer_does(tmp_path):
    """Blob::Reshape reallocates (zeroed) only when the count grows past the capacity; a
    smaller or equal count reads the same buffer in the new shape."""
    path = tmp_path / "ip.prototxt"
    path.write_text("input: 'x' input_shape { dim: 1 dim: 3 }\nlayer { name: 'ip' "
                    "type: 'InnerProduct' bottom: 'x' top: 'y' inner_product_param { "
                    "num_output: 2 } }\n")
    net = caffe.Net(str(path), caffe.TEST)
    w = net.params["ip"][0]
    w.data[...] = np.arange(6).reshape(2, 3)
    w.reshape(3, 2)
    np.testing.assert_array_equal(w.data, [[0, 1], [2, 3], [4, 5]])
    w.reshape(4)
    np.testing.assert_array_equal(w.data, [0, 1, 2, 3])
    w.reshape(2, 4)
    assert w.data.shape == (2, 4) and not w.data.any() and not w.diff.any()


def test_host_arrays_made_on_first_use_read_as_caffes_fresh_memory():
    """Data and diff arrays are made when first used (zeros, of the blob's shape), kept
    through a reshape of the same count, and made again after a count change."""
    state = BlobState()
    state.add("b", (2, 3))
    assert state.shape("b") == (2, 3)
    np.testing.assert_array_equal(state.get("b", "diff"), np.zeros((2, 3), np.float32))
    state.get("b")[...] = 1.0
    diff = state.get("b", "diff")
    diff[...] = 2.0
    state.reshape("b", (3, 2))                     # same count: both keep their values
    assert state.get("b").shape == state.get("b", "diff").shape == (3, 2)
    assert (state.get("b") == 1).all() and (state.get("b", "diff") == 2).all()
    held = state.hold(["b"])
    state.reshape("b", (4, 4))                     # another count: zeros when read
    assert state.shape("b") == (4, 4)
    assert not state.get("b", "diff").any() and state.get("b").shape == (4, 4)
    state.restore(held)                            # the very arrays come back
    assert state.get("b", "diff").base is diff or state.get("b", "diff") is diff
    assert state.shape("b") == (3, 2) and (state.get("b") == 1).all()
    state.put("b", torch.ones(5))                  # a value of another shape from the engine
    assert state.shape("b") == (5,) and state.get("b", "diff").shape == (5,)
