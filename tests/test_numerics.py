"""Numerics hygiene (engine/numerics.py): subnormal weights flushed at load, thread defaults,
OpenMP's wait policy."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import caffe_compat as caffe
from caffe_compat.engine import numerics

NET = """name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.05 } } }
"""
TINY = 1e-40          # subnormal in float32 (below 2**-126 = 1.18e-38)


def _subnormal_caffemodel(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(NET)
    net = caffe.Net(str(proto), caffe.TEST)
    w = net.params["conv1"][0].data
    w[:, :, 0, 0] = TINY                  # one subnormal per filter, as in the face-mask SSD
    net.params["ip1"][0].data[:, ::7] = -TINY
    net.params["prelu1"][0].data[::2] = TINY
    model = tmp_path / "w.caffemodel"
    net.save(str(model))
    return proto, model, {k: [b.data.copy() for b in v] for k, v in net.params.items()}


def _float64_forward(params, x):
    """The net in float64 with the exact (unflushed) weights: the reference."""
    w, b = (torch.from_numpy(a).double() for a in params["conv1"])
    y = F.prelu(F.conv2d(x, w, b), torch.from_numpy(params["prelu1"][0]).double())
    wi, bi = (torch.from_numpy(a).double() for a in params["ip1"])
    return F.linear(y.reshape(len(y), -1), wi, bi)


def test_subnormal_weights_load_flushed_and_outputs_unchanged(tmp_path, caplog):
    proto, model, exact = _subnormal_caffemodel(tmp_path)
    assert np.count_nonzero(np.abs(exact["conv1"][0]) == np.float32(TINY)) == 8 * 3
    logger = logging.getLogger("caffe_compat.engine.weights")   # a CLI test may have set
    logger.addHandler(caplog.handler)                           # glog's non-propagating one
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            net = caffe.Net(str(proto), str(model), caffe.TEST)
    finally:
        logger.removeHandler(caplog.handler)
    for name, blobs in net.params.items():
        for blob in blobs:
            a = np.abs(blob.data)
            assert not ((a > 0) & (a < np.finfo(np.float32).tiny)).any(), name
    flushed = 8 * 3 + 5 * int(np.ceil(exact["ip1"][0].shape[1] / 7)) + 4
    assert f"{flushed} subnormal weight value(s)" in caplog.text
    x = np.random.default_rng(0).standard_normal(net.blobs["data"].shape).astype(np.float32)
    got = net.forward(data=x)["ip1"]
    want = _float64_forward(exact, torch.from_numpy(x).double()).numpy()
    # Stated tolerance: the flushed net equals float64 with the exact weights to float32
    # rounding (the flushed terms are < 1e-38 and vanish beside any normal output).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the normal weights are bit for bit the file's
    normal = np.abs(exact["conv1"][0]) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(net.params["conv1"][0].data[normal], exact["conv1"][0][normal])


def test_subnormals_kept_on_request(tmp_path, monkeypatch):
    proto, model, exact = _subnormal_caffemodel(tmp_path)
    monkeypatch.setenv(numerics.KEEP_SUBNORMALS_ENV, "1")
    net = caffe.Net(str(proto), str(model), caffe.TEST)
    for name, blobs in net.params.items():
        for blob, want in zip(blobs, exact[name]):
            assert blob.data.tobytes() == want.tobytes()


def test_flush_counts_and_leaves_normals():
    t = torch.tensor([1e-40, -1e-39, 1.2e-38, 0.0, 1.0, -3e-45])
    assert numerics.flush_subnormals_(t) == 3
    assert t.tolist() == [0.0, 0.0, pytest.approx(1.2e-38), 0.0, 1.0, 0.0]
    assert numerics.flush_subnormals_(torch.arange(3)) == 0        # integers: untouched


@pytest.mark.parametrize("cpus,load,want", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.7, 1),
                                             (2, 6.0, 1), (16, 3.2, 13), (1, 0.0, 1)])
def test_default_threads_leave_busy_cores(cpus, load, want):
    assert numerics.default_threads(cpus, load) == want


def test_threads_from_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(numerics.THREADS_ENV, "1")
        assert numerics.configure_threads() == 1 == torch.get_num_threads()
        assert numerics.configure_threads(2) == 2          # an explicit --threads wins
        monkeypatch.setenv(numerics.THREADS_ENV, "two")
        with pytest.raises(ValueError, match="CAFFE_COMPAT_THREADS"):
            numerics.configure_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("preset,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_passive_wait_before_torch_loads(preset, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import sys, caffe_compat.engine, os; assert 'torch' in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == want
