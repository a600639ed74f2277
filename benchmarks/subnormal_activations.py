#!/usr/bin/env python3
"""Subnormal activations: a fused inference forward with and without flush-to-zero.

    python benchmarks/subnormal_activations.py [--size 64] [--iters 20] [--rounds 5]

The net (built here) has weights of normal float32 magnitude whose products leave the normal
range: conv1's weights ~1e-20 make ~1e-19 activations, conv2's ~1e-20 make ~1e-38, below
2**-126 = 1.18e-38 (subnormal); conv3-conv5 (weights ~0.25, no bias) keep them there, and
the InnerProduct (weights ~1, bias ~1) brings the output back to normal values. Weights are
not subnormal, so the flush at load does not help; only the forward's flush-to-zero does.
Times the FusedNet with ``flush_denormals`` on and off, alternating in one process, one
thread, and reports the share of subnormal values per blob and the largest output difference
(between the two, and against a float64 run of the same weights), also with the
InnerProduct's weights scaled by 1e30 so that the output depends on the subnormal values.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from caffe_compat.engine.net.fuse import fused_for_inference  # noqa: E402
from caffe_compat.engine.net.module import build_net  # noqa: E402
from caffe_compat.formats.blob_io import read_text_proto  # noqa: E402
from caffe_compat.proto import caffe_pb2  # noqa: E402
from suite.timing import alternate  # noqa: E402

TINY = 1.1754943508222875e-38


def prototxt(size: int) -> str:
    text = ('name: "subnormal_activations" layer { name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}\n')
    bottom = "data"
    for i in range(1, 6):
        text += (f'layer {{ name: "conv{i}" type: "Convolution" bottom: "{bottom}" '
                 f'top: "conv{i}" convolution_param {{ num_output: 32 kernel_size: 3 pad: 1 '
                 'bias_term: false } }\n'
                 f'layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}\n')
        bottom = f"conv{i}"
    return text + ('layer { name: "pool" type: "Pooling" bottom: "conv5" top: "pool" '
                   'pooling_param { pool: AVE global_pooling: true } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" '
                   'inner_product_param { num_output: 10 } }\n')


def build(size: int, path: Path):
    path.write_text(prototxt(size))
    net = build_net(read_text_proto(str(path), caffe_pb2.NetParameter), caffe_pb2.TEST,
                    source=str(path)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in net.layers:
            if layer.type == "Convolution":
                scale = 1e-20 if layer.name in ("conv1", "conv2") else 0.25
                layer.blobs[0].copy_(torch.randn(layer.blobs[0].shape, generator=gen) * scale)
            elif layer.type == "InnerProduct":
                layer.blobs[0].copy_(torch.randn(layer.blobs[0].shape, generator=gen))
                layer.blobs[1].copy_(torch.randn(layer.blobs[1].shape, generator=gen))
    return net


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net = build(args.size, Path(f"/tmp/subnormal_activations_{os.getpid()}.prototxt"))
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    flushed, kept = fused_for_inference(net), fused_for_inference(net)
    kept.flush_denormals = False
    with torch.no_grad():
        blobs = net.run({"data": x})                 # the layer-by-layer path: IEEE
        share = {k: float(((v != 0) & (v.abs() < TINY)).float().mean())
                 for k, v in blobs.items() if k.startswith("conv")}
        times = alternate({"flush": lambda: flushed(x), "keep": lambda: kept(x)},
                          args.iters, args.rounds)
        effects = [output_effect(net, x, scale) for scale in (1.0, 1e30)]
    print(f"load average {os.getloadavg()}; 1 thread; input 1x3x{args.size}x{args.size}")
    print("subnormal share per blob (IEEE run): "
          + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
    print(f"forward ms: flush-to-zero {times['flush']['ms']:.2f}, IEEE {times['keep']['ms']:.2f}"
          f" ({times['keep']['ms'] / times['flush']['ms']:.1f}x); rounds "
          f"{times['flush']['rounds_ms']} / {times['keep']['rounds_ms']}")
    for scale, effect in zip((1.0, 1e30), effects):
        print(f"ip weights x{scale:g}: max |out flush - out IEEE| {effect[0]:.3g}, output range "
              f"{effect[1]:.3g}; max |out - float64|: flush {effect[2]:.3g}, IEEE {effect[3]:.3g}")
    return 0


def output_effect(net, x: torch.Tensor, scale: float) -> tuple[float, ...]:
    """(max |flushed - IEEE|, max |IEEE|, max |flushed - float64|, max |IEEE - float64|) with
    the InnerProduct's weights multiplied by ``scale``."""
    ip = net.layers[net.layer_index("ip")].blobs[0]
    ip.mul_(scale)
    try:
        flushed, kept = fused_for_inference(net), fused_for_inference(net)
        kept.flush_denormals = False
        out_f, out_k = flushed(x)[0], kept(x)[0]
        exact = net.double()(data=x.double())["ip"]
    finally:
        net.float()
        ip.div_(scale)
    return (float((out_f - out_k).abs().max()), float(out_k.abs().max()),
            float((out_f.double() - exact).abs().max()),
            float((out_k.double() - exact).abs().max()))


if __name__ == "__main__":
    sys.exit(main())
