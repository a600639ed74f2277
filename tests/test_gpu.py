"""CUDA: pycaffe in GPU mode (engine/net/inference_cache.py's CUDA graphs, engine/gpu.py) gives
the CPU's answers. Run by ``make gpu-check``; skipped where PyTorch sees no CUDA device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine import gpu
from test_backends import _prototxt, _weights, assert_same_rows

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (make gpu-check on a GPU machine)")]

RTOL = 1e-4      # cuDNN and oneDNN sum in different orders; TF32 is off


@pytest.fixture
def gpu_mode():
    """The process goes back to CPU mode after the test, whatever it set."""
    yield
    caffe.set_mode_cpu()


def _pair(tmp_path, family: str):
    """The same weights as a CPU net and, built in GPU mode, a CUDA net."""
    proto = _prototxt(tmp_path, family)
    caffe.set_mode_cpu()
    weights = _weights(tmp_path, proto)
    cpu = caffe.Net(proto, weights, caffe.TEST)
    caffe.set_mode_gpu()
    cuda = caffe.Net(proto, weights, caffe.TEST)
    return cpu, cuda


def _close(got, want):
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= RTOL * scale


@pytest.mark.parametrize("family", ["lenet", "mtcnn_onet", "ultraface_slim"])
def test_gpu_forward_equals_cpu_for_each_new_input(tmp_path, gpu_mode, family):
    cpu, cuda = _pair(tmp_path, family)
    assert cuda.compute_device().type == "cuda" and cuda.fast_path
    rng = np.random.default_rng(0)
    for _ in range(3):              # a replayed graph must see each new input
        x = rng.random(cpu.blobs["data"].shape, dtype=np.float32)
        want = {k: v.copy() for k, v in cpu.forward(data=x).items()}
        got = cuda.forward(data=x)
        for name in want:
            _close(got[name], want[name])
    assert cuda._fast.cache.graph_reason is None          # it was replayed from a graph
    inner = cpu.blobs.keys() - set(cpu.outputs) - set(cpu.inputs)
    for name in sorted(inner)[:3]:                        # stale blobs read as on the CPU
        _close(cuda.blobs[name].data, cpu.blobs[name].data)


def test_gpu_forward_sees_changed_weights_and_shapes(tmp_path, gpu_mode):
    cpu, cuda = _pair(tmp_path, "lenet")
    x = np.random.default_rng(1).random(cpu.blobs["data"].shape, dtype=np.float32)
    cuda.forward(data=x)
    for net in (cpu, cuda):          # a numpy write through the params view
        net.params["conv1"][0].data[...] *= -1.5
    _close(cuda.forward(data=x)["prob"], cpu.forward(data=x)["prob"].copy())
    for net in (cpu, cuda):
        net.blobs["data"].reshape(4, *cpu.blobs["data"].shape[1:])
        net.reshape()
    x4 = np.random.default_rng(2).random(cpu.blobs["data"].shape, dtype=np.float32)
    want = cpu.forward(data=x4)["prob"].copy()
    got = cuda.forward(data=x4)["prob"]
    assert got.shape == want.shape
    _close(got, want)


def test_detection_output_on_the_gpu_equals_the_cpu(tmp_path, gpu_mode):
    cpu, cuda = _pair(tmp_path, "ssd_face")
    rng = np.random.default_rng(3)
    for _ in range(2):
        x = rng.random(cpu.blobs["data"].shape, dtype=np.float32)
        want = cpu.forward(data=x)["detection_out"].copy()
        got = cuda.forward(data=x)["detection_out"]
        assert got.shape == want.shape and want.shape[2] > 1
        assert_same_rows(got, want, 2e-4)
    assert "detection_out" in cuda._fast.cache.graph_reason      # never captured


def test_engines_on_a_gpu_net_leave_it_on_torch(tmp_path, gpu_mode):
    proto = _prototxt(tmp_path, "lenet")
    caffe.set_mode_gpu()
    net = caffe.Net(proto, caffe.TEST, engine="auto")
    assert net.engine == "torch" and net.compute_device().type == "cuda"


def test_a_graph_replays_new_inputs_and_runs_other_shapes_eagerly():
    fn = lambda x: (torch.relu(x) * 3 + 1,)                   # noqa: E731
    x = torch.randn(2, 5, device="cuda")
    graphed = gpu.GraphedInference(fn, [x])
    assert graphed.graph is not None and graphed.reason is None
    for _ in range(2):
        y = torch.randn(2, 5, device="cuda")
        assert torch.equal(graphed(y)[0], fn(y)[0])
    z = torch.randn(3, 5, device="cuda")
    assert not graphed.matches([z]) and torch.equal(graphed(z)[0], fn(z)[0])


def test_a_forward_that_syncs_with_the_host_is_not_captured():
    fn = lambda x: (x[: int(x.sum().item() > 0) + 1] * 2,)   # noqa: E731
    x = torch.ones(3, device="cuda")
    graphed = gpu.GraphedInference(fn, [x])
    assert graphed.graph is None and graphed.reason.startswith("capture failed")
    assert graphed.serves([x]) and torch.equal(graphed(-x)[0], fn(-x)[0])


def test_a_pyramid_of_shapes_keeps_a_graph_per_shape_then_runs_eagerly(tmp_path, gpu_mode):
    """MTCNN's P-Net sees one input shape per pyramid scale, in a cycle: the first
    GRAPHS_KEPT shapes keep their graphs (replayed on the next image, not re-captured), the
    others run eagerly; every output equals the CPU's."""
    from caffe_compat.engine.net import inference_cache
    cpu, cuda = _pair(tmp_path, "mtcnn_pnet")
    sizes = [(24 + 4 * i, 32 + 4 * i) for i in range(inference_cache.GRAPHS_KEPT + 2)]
    rng = np.random.default_rng(4)
    kept = None
    for image in range(2):
        for h, w in sizes:
            for net in (cpu, cuda):
                net.blobs["data"].reshape(1, 3, h, w)
            x = rng.random((1, 3, h, w), dtype=np.float32)
            want = {k: v.copy() for k, v in cpu.forward(data=x).items()}
            got = cuda.forward(data=x)
            for name in want:
                _close(got[name], want[name])
        graphs = dict(cuda._fast.cache._graphs)
        assert len(graphs) == inference_cache.GRAPHS_KEPT
        if kept is not None:                  # the second image replayed the same graphs
            assert all(graphs[k] is kept[k] for k in kept)
        kept = graphs
