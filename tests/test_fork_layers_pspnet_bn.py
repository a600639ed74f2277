"""PSPNet's BN (hszhao/PSPNet bn_layer.cpp) beside SegNet's, and DeepLab/PSPNet's BatchNorm
``update_global_stats``, against float64 re-statements of the forks' code (docs/forks.md)."""
import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import TEST, TRAIN, LayerError
from caffe_compat.proto import caffe_pb2
from layer_utils import gradcheck_layer, make_layer

PSP = ('name: "bn" type: "BN" bn_param { slope_filler { type: "constant" value: 1 } '
       'bias_filler { type: "constant" value: 0 } %s }')


def rand(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape))


def channel(v):
    return np.asarray(v, dtype=np.float64).reshape(1, -1, 1, 1)


def stored_reference(x, slope, bias, mean, var, eps):
    """``slope * (x - mean) / sqrt(var + eps) + bias`` per channel, in float64."""
    return channel(slope) * (x - channel(mean)) / np.sqrt(channel(var) + eps) + channel(bias)


def batch_moments(x):
    """Per channel: the mean over N, H, W and the biased variance, by loops."""
    n, c, h, w = x.shape
    mean, var = np.zeros(c), np.zeros(c)
    for k in range(c):
        values = [x[i, k, y, z] for i in range(n) for y in range(h) for z in range(w)]
        mean[k] = sum(values) / len(values)
        var[k] = sum((v - mean[k]) ** 2 for v in values) / len(values)
    return mean, var


def set_blobs(layer, *values):
    with torch.no_grad():
        for blob, v in zip(layer.blobs, values):
            blob.copy_(torch.tensor(np.asarray(v, dtype=np.float32)).reshape(blob.shape))


STATS = ([1.5, -0.5, 2.0], [0.1, 0.2, -0.3], [0.3, -1.0, 0.5], [0.8, 2.5, 0.05])


def test_fields_pick_the_fork_and_blobs():
    assert len(make_layer(PSP % "frozen: true", [(2, 3, 2, 2)]).blobs) == 4
    segnet = make_layer('name: "bn" type: "BN" bn_param { scale_filler { type: "constant" '
                        'value: 1 } }', [(2, 3, 2, 2)])
    assert len(segnet.blobs) == 2 and not segnet.pspnet
    four_params = make_layer('name: "bn" type: "BN" ' + 'param { lr_mult: 1 } ' * 4,
                             [(2, 3, 2, 2)])
    assert four_params.pspnet and [tuple(b.shape) for b in four_params.blobs] == [(1, 3, 1, 1)] * 4
    with pytest.raises(LayerError, match=r"layer 'bn' \(BN\): bn_param mixes SegNet's "
                       r"scale_filler with PSPNet's frozen"):
        make_layer('name: "bn" type: "BN" bn_param { scale_filler { value: 1 } frozen: true }',
                   [(2, 3, 2, 2)])
    with pytest.raises(LayerError, match="PSPNet's BN .* has one top"):
        make_layer(PSP % 'momentum: 0.9' + ' top: "a" top: "m"', [(2, 3, 2, 2)])


def test_initial_blobs_and_pinned_learning_rates():
    frozen = make_layer(PSP % "frozen: true" + " param { lr_mult: 1 decay_mult: 1 }", [(2, 3, 2, 2)])
    assert [float(b.detach().reshape(-1)[0]) for b in frozen.blobs] == [1, 0, 0, 1]   # var starts at 1
    assert [(s.lr_mult, s.decay_mult) for s in frozen.param.param] == [(0, 0)] * 4
    free = make_layer(PSP % "", [(2, 3, 2, 2)])
    assert float(free.blobs[3].reshape(-1)[0]) == 0
    assert [s.lr_mult for s in free.param.param] == [1, 1, 0, 0]


@pytest.mark.parametrize("text, phase", [(PSP % "frozen: true", TRAIN), (PSP % "", TEST)])
def test_stored_statistics_forward(text, phase):
    x = rand(2, 3, 3, 4)
    layer = make_layer(text, [x.shape], phase).double()
    set_blobs(layer, *STATS)
    before = [b.detach().clone() for b in layer.blobs]
    out = layer(x).detach().numpy()
    np.testing.assert_allclose(out, stored_reference(x.numpy(), *[np.float32(s) for s in STATS],
                                                     1e-5), rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.blobs))   # nothing updated


def test_train_uses_batch_statistics_and_updates_running_ones():
    x1, x2 = rand(2, 3, 3, 4, seed=1), rand(2, 3, 3, 4, seed=2) * 2 + 1
    layer = make_layer(PSP % "momentum: 0.95 eps: 1e-3", [x1.shape], TRAIN).double()
    set_blobs(layer, STATS[0], STATS[1])
    mean1, var1 = batch_moments(x1.numpy())
    out = layer(x1).detach().numpy()
    np.testing.assert_allclose(out, stored_reference(x1.numpy(), np.float32(STATS[0]),
                                                     np.float32(STATS[1]), mean1, var1, 1e-3),
                               rtol=1e-9)
    layer(x2)
    mean2, var2 = batch_moments(x2.numpy())
    running_mean = 0.95 * (0.05 * mean1) + 0.05 * mean2   # starts at 0, biased variances
    running_var = 0.95 * (0.05 * var1) + 0.05 * var2
    np.testing.assert_allclose(layer.blobs[2].detach().reshape(-1), running_mean, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[3].detach().reshape(-1), running_var, rtol=1e-6)


def test_cudnn_engine_keeps_the_unbiased_variance_and_clamps_eps():
    x = rand(2, 3, 2, 2, seed=3)
    layer = make_layer(PSP % "engine: CUDNN momentum: 0.5 eps: 1e-9", [x.shape], TRAIN).double()
    assert layer.eps == pytest.approx(1e-5)
    layer(x)
    _, var = batch_moments(x.numpy())
    np.testing.assert_allclose(layer.blobs[3].detach().reshape(-1), 0.5 * var * 8 / 7, rtol=1e-6)


def test_train_gradient_finite_differences():
    layer = make_layer(PSP.replace('value: 1', 'value: 1.3') % "", [(3, 2, 2, 3)], TRAIN)
    gradcheck_layer(layer, [rand(3, 2, 2, 3, seed=4)])


def test_frozen_gradient_is_slope_over_std_and_learns_nothing():
    x = rand(2, 3, 2, 2, seed=5).requires_grad_(True)
    layer = make_layer(PSP % "frozen: true", [x.shape], TRAIN).double()
    set_blobs(layer, *STATS)
    dy = rand(2, 3, 2, 2, seed=6)
    (layer(x) * dy).sum().backward()
    expected = dy.numpy() * channel(np.float32(STATS[0])) / np.sqrt(channel(np.float32(STATS[3])) + 1e-5)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)
    assert all(b.grad is None for b in layer.blobs)


def test_test_phase_backward_is_the_forks_batch_formula_with_stored_statistics():
    x = rand(2, 3, 2, 2, seed=7).requires_grad_(True)
    layer = make_layer(PSP % "", [x.shape], TEST).double()
    set_blobs(layer, *STATS)
    dy = rand(2, 3, 2, 2, seed=8).numpy()
    (layer(x) * torch.from_numpy(dy)).sum().backward()
    slope, _, mean, var = (channel(np.float32(s)) for s in STATS)
    inv_std = 1 / np.sqrt(var + 1e-5)
    x_hat = (x.detach().numpy() - mean) * inv_std
    g = dy * slope
    m = 8   # N * H * W
    expected = inv_std * (g - g.sum(axis=(0, 2, 3), keepdims=True) / m
                          - x_hat * (x_hat * g).sum(axis=(0, 2, 3), keepdims=True) / m)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(layer.blobs[0].grad.reshape(-1),
                               (x_hat * dy).sum(axis=(0, 2, 3)), rtol=1e-6)


NET = '''name: "psp"
input: "data" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 5
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 3 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "conv1/bn" type: "BN" bottom: "conv1" top: "conv1"
  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0 }
    frozen: true momentum: 0.95 } }
layer { name: "conv1/relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "bn2" type: "BN" bottom: "conv1" top: "out"
  bn_param { slope_filler { type: "constant" value: 1 } momentum: 0.9 } }
'''


def _blob(values):
    values = np.asarray(values, dtype=np.float32)
    return caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=values.shape), data=values.reshape(-1))


def _pspnet_caffemodel(path, weight, stats1, stats2):
    """A caffemodel as PSPNet's are: four [1, C, 1, 1] blobs per BN layer, and its bn_param
    (field 152 in PSPNet's LayerParameter) in the layer record."""
    net = caffe_pb2.NetParameter(name="psp")
    net.layer.add(name="conv1", type="Convolution", blobs=[_blob(weight)])
    raw = net.SerializeToString()
    psp_bn_param = bytes([0x18 + 0x05]) + np.float32(0.95).tobytes() + bytes([0x28, 0x01])
    for name, stats in (("conv1/bn", stats1), ("bn2", stats2)):
        layer = caffe_pb2.LayerParameter(name=name, type="BN",
                                         blobs=[_blob(channel(s)) for s in stats])
        body = layer.SerializeToString() + bytes([0xC2, 0x09, len(psp_bn_param)]) + psp_bn_param
        raw += bytes([0xA2, 0x06]) + _varint(len(body)) + body    # NetParameter.layer = 100
    path.write_bytes(raw)


def _varint(n):
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        out += bytes([low | (0x80 if n else 0)])
        if not n:
            return out


def test_pspnet_net_loads_caffemodel_by_name_and_matches_reference(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    rng = np.random.default_rng(9)
    weight = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    stats2 = ([0.5, 2, 1], [1, 0, -1], [0.1, 0.2, 0.3], [1.5, 0.5, 2])
    _pspnet_caffemodel(tmp_path / "w.caffemodel", weight, STATS, stats2)
    net = caffe.Net(str(tmp_path / "net.prototxt"), str(tmp_path / "w.caffemodel"), caffe.TEST)
    x = rng.normal(size=(1, 2, 4, 5)).astype(np.float32)
    net.blobs["data"].data[...] = x
    out = net.forward()["out"]
    conv = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                      torch.from_numpy(weight).double(), padding=1).numpy()
    hidden = np.maximum(stored_reference(conv, *[np.float32(s) for s in STATS], 1e-5), 0)
    expected = stored_reference(hidden, *[np.float32(s) for s in stats2], 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert np.allclose(net.params["conv1/bn"][3].data.reshape(-1), STATS[3])


def test_bad_parameters_name_the_layer():
    with pytest.raises(LayerError, match=r"layer 'bn' \(BN\): bn_param.eps \(-1\) must not be"):
        make_layer(PSP % "eps: -1", [(2, 3, 2, 2)])
    with pytest.raises(LayerError, match="5 param blocks for PSPNet's 4 blobs"):
        make_layer(PSP % "" + " param { lr_mult: 1 }" * 5, [(2, 3, 2, 2)])


BATCHNORM = ('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true '
             'update_global_stats: true moving_average_fraction: 0.9 eps: 1e-4 }')


def test_update_global_stats_refits_the_variance_around_the_stored_mean():
    x = rand(2, 3, 2, 3, seed=10).requires_grad_(True)
    layer = make_layer(BATCHNORM, [x.shape], TRAIN).double()
    mean_sum, var_sum, factor = np.array([0.4, -0.2, 1.0]), np.array([2.0, 1.0, 0.5]), 2.0
    set_blobs(layer, mean_sum, var_sum, [factor])
    mean = mean_sum / factor
    xs = x.detach().numpy()
    v = ((xs - channel(mean)) ** 2).mean(axis=(0, 2, 3))
    out = layer(x)
    np.testing.assert_allclose(out.detach().numpy(), (xs - channel(mean)) / np.sqrt(channel(v) + 1e-4),
                               rtol=1e-6)
    m = 12
    np.testing.assert_allclose(layer.blobs[2].detach().numpy(), [0.9 * factor + 1])
    np.testing.assert_allclose(layer.blobs[0].detach().numpy(), mean + 0.9 * mean_sum, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].detach().numpy(), v * m / (m - 1) + 0.9 * var_sum,
                               rtol=1e-6)
    stored_mean = layer.blobs[0].detach().numpy() / layer.blobs[2].detach().numpy()
    np.testing.assert_allclose(stored_mean, mean, rtol=1e-6)      # the mean stays put
    dy = rand(2, 3, 2, 3, seed=11)
    (out * dy).sum().backward()                                    # variance held constant
    np.testing.assert_allclose(x.grad.numpy(), dy.numpy() / np.sqrt(channel(v) + 1e-4), rtol=1e-6)


def test_update_global_stats_does_nothing_at_test():
    x = rand(2, 3, 2, 3, seed=12)
    layer = make_layer(BATCHNORM, [x.shape], TEST).double()
    set_blobs(layer, [0.4, -0.2, 1.0], [2.0, 1.0, 0.5], [2.0])
    out = layer(x).detach().numpy()
    np.testing.assert_allclose(out, (x.numpy() - channel([0.2, -0.1, 0.5]))
                               / np.sqrt(channel([1.0, 0.5, 0.25]) + 1e-4), rtol=1e-6)
    assert float(layer.blobs[2]) == 2.0


def test_affine_form_only_where_the_forward_is_affine():
    """``affine`` lets an inference plan fold the layer into a convolution before it."""
    x = rand(2, 3, 2, 2, seed=13)
    for text, phase in ((PSP % "", TEST), (PSP % "frozen: true", TRAIN)):
        layer = make_layer(text, [x.shape], phase).double()
        set_blobs(layer, *STATS)
        a, s = layer.affine(3)
        np.testing.assert_allclose(a.view(1, 3, 1, 1) * x + s.view(1, 3, 1, 1),
                                   layer(x).detach(), rtol=1e-6)
    assert make_layer(PSP % "", [x.shape], TRAIN).affine(3) is None
    segnet = 'name: "bn" type: "BN" bn_param { bn_mode: %s scale_filler { value: 2 } }'
    a, s = make_layer(segnet % "INFERENCE", [x.shape]).affine(3)
    assert a.tolist() == [2, 2, 2] and s.tolist() == [0, 0, 0]
    assert make_layer(segnet % "LEARN", [x.shape]).affine(3) is None
