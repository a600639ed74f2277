"""Subnormal activations (engine/net/denormals.py): an inference forward flushes them to zero,
changes nothing where none occur, and puts the thread's mode back; training's path keeps them."""
import pytest
import torch

from caffe_compat.engine.net.denormals import KEEP_SUBNORMALS_ENV, FlushDenormals, denormals_flushed
from caffe_compat.engine.net.frozen import frozen_for_inference
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

TINY = 1.1754943508222875e-38          # the smallest normal float32


def _net(tmp_path, conv_scale: float = 1.0, ip_scale: float = 1.0):
    """conv (3x3, no bias) -> ReLU -> InnerProduct, their weights scaled by these."""
    path = tmp_path / "net.prototxt"
    path.write_text(
        'name: "tiny" layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
        'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param '
        '{ num_output: 4 kernel_size: 3 bias_term: false weight_filler { type: "gaussian" } } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param '
        '{ num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }\n')
    torch.manual_seed(0)
    net = build_net(read_text_proto(str(path), caffe_pb2.NetParameter), caffe_pb2.TEST,
                    source=str(path)).eval()
    with torch.no_grad():
        net.layers[net.layer_index("conv")].blobs[0].mul_(conv_scale)
        net.layers[net.layer_index("ip")].blobs[0].mul_(ip_scale)
    return net


@pytest.fixture(autouse=True)
def _ieee_mode():
    assert not denormals_flushed()
    yield
    torch.set_flush_denormal(False)


def test_probe_reads_the_thread_mode():
    assert not denormals_flushed()
    with FlushDenormals():
        assert denormals_flushed()
        assert torch.tensor([TINY / 4]).mul(1.0).item() == 0.0
        with FlushDenormals():                      # nested: the outer one restores
            pass
        assert denormals_flushed()
    assert not denormals_flushed()
    assert torch.tensor([TINY / 4]).mul(1.0).item() != 0.0


@pytest.mark.parametrize("frozen", [False, True])
def test_outputs_unchanged_without_subnormals_and_mode_restored(tmp_path, frozen):
    net = _net(tmp_path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    run, ieee = fused_for_inference(net), fused_for_inference(net)
    ieee.flush_denormals = False
    if frozen:                                        # oneDNN's kernels: compare like with like
        run, ieee = frozen_for_inference(run, [x]), frozen_for_inference(ieee, [x])
    with torch.no_grad():
        assert torch.equal(run(x)[0], ieee(x)[0])
        assert not denormals_flushed()                # put back after the call
        torch.set_flush_denormal(True)                # a user's own setting stays
        run(x)
        assert denormals_flushed()


def test_subnormal_activations_flushed_in_inference_only(tmp_path, monkeypatch):
    net = _net(tmp_path, 1e-39, 1e36)     # conv's outputs subnormal, the output depends on them
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) + 0.5
    with torch.no_grad():
        blobs = net.run({"data": x})                  # layer by layer: Caffe's IEEE values
        conv = blobs["conv"]
        assert bool(((conv > 0) & (conv < TINY)).any())
        ip = net.layers[net.layer_index("ip")]
        bias_only = ip.blobs[1].expand(2, 3)
        assert torch.equal(fused_for_inference(net)(x)[0], bias_only)   # flushed to 0
        monkeypatch.setenv(KEEP_SUBNORMALS_ENV, "1")
        kept = fused_for_inference(net)(x)[0]
    assert torch.equal(kept, blobs["ip"]) and not torch.equal(kept, bias_only)
    assert not denormals_flushed()
