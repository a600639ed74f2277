"""coord_map: BVLC's test_coord_map.py checks on a conv-pool-deconv NetSpec, plus a crop
whose offset is verified by running the net (the cropped window equals the reference)."""
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat import layers as L, params as P
from caffe_compat.coord_map import coord_map_from_to, crop


def coord_net_spec(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    deconv_ks = [s * 2 for s in dstride] if isinstance(dstride, list) else dstride * 2
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=deconv_ks, stride=dstride,
                               pad=dpad)
    return n


def test_conv_pool_deconv():
    n = coord_net_spec()
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, 0)
    n = coord_net_spec(pool=4, dstride=4)
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, -1)


def test_pass_through_and_1x1_conv_are_identity():
    n = coord_net_spec()
    base = coord_map_from_to(n.deconv, n.data)
    n.relu = L.ReLU(n.deconv)
    n.conv1x1 = L.Convolution(n.relu, num_output=10, kernel_size=1, stride=1, pad=0)
    for top in (n.relu, n.conv1x1):
        assert coord_map_from_to(top, n.data) == base


@pytest.mark.parametrize("pad", [0, 3, 10])
def test_padding(pad):
    n = coord_net_spec()
    _, a, b = coord_map_from_to(n.deconv, n.data)
    for kwargs, shift in ((dict(pad=pad), -pad), (dict(dpad=pad), pad),
                          (dict(pad=pad, dpad=pad), 0)):
        m = coord_net_spec(**kwargs)
        _, a2, b2 = coord_map_from_to(m.deconv, m.data)
        assert a2 == a and b2 == b + shift


def test_multi_bottom_conv_maps_each_alike():
    n = coord_net_spec()
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=10,
                                            kernel_size=5, stride=2, pad=0)
    assert coord_map_from_to(n.conv_data, n.data) == coord_map_from_to(n.conv_aux, n.aux)


def test_rect_and_nd():
    n33 = coord_net_spec(ks=3, stride=1, pad=0)
    n55 = coord_net_spec(ks=5, stride=2, pad=10)
    n35 = coord_net_spec(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    ax33, a33, b33 = coord_map_from_to(n33.deconv, n33.data)
    ax55, a55, b55 = coord_map_from_to(n55.deconv, n55.data)
    ax35, a35, b35 = coord_map_from_to(n35.deconv, n35.data)
    assert ax33 == ax55 == ax35
    assert (a33, b33, a55, b55) == (a35[0], b35[0], a35[1], b35[1])
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1],
                           pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2, pad=0)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and len(a) == len(b) and np.all(a == 1)
    assert b[0] - 1 == b[1] and b[1] - 1 == b[2]


@pytest.mark.parametrize("offset", [0, 4, 10])
def test_crop_of_crop(offset):
    n = coord_net_spec()
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    n.crop = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    assert coord_map_from_to(n.crop, n.data) == (ax, a, b + offset)


def test_crop_helper_offset_aligns_when_run(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 12, 12]))
    n.big = L.Convolution(n.data, num_output=1, kernel_size=1, pad=3, bias_term=False,
                          weight_filler=dict(type="constant", value=1))
    n.cropped = crop(n.big, n.data)
    proto = n.to_proto()
    assert list(proto.layer[-1].crop_param.offset) == [3] and proto.layer[-1].crop_param.axis == 2
    path = tmp_path / "crop.prototxt"
    path.write_text(str(proto))
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.RandomState(0).normal(size=(1, 1, 12, 12)).astype(np.float32)
    np.testing.assert_array_equal(net.forward(data=x)["cropped"], x)


def test_catch_errors():
    n = coord_net_spec()
    n.ip = L.InnerProduct(n.deconv, num_output=10)
    with pytest.raises(RuntimeError):
        coord_map_from_to(n.ip, n.data)
    n = coord_net_spec(pool=3, dstride=2)
    with pytest.raises(AssertionError):
        crop(n.deconv, n.data)
    n = coord_net_spec(dpad=10)
    with pytest.raises(AssertionError):
        crop(n.deconv, n.data)
