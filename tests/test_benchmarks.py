"""benchmarks/run.py --quick (smoke run) and the generated deploy nets."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caffe_compat.engine.analysis import param_count, total_macs
from caffe_compat.engine.layers.base import TEST
from caffe_compat.engine.net.module import build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]
NETS = ROOT / "benchmarks" / "nets"
sys.path.insert(0, str(ROOT / "benchmarks"))

# Published sizes: parameters (millions) and multiply-accumulates per image (billions).
PUBLISHED = {"alexnet": (61.0, 0.72), "googlenet": (7.0, 1.58), "vgg16": (138.4, 15.5),
             "resnet50": (25.6, 3.86), "squeezenet1_1": (1.24, 0.39),
             "mobilenet_v1": (4.2, 0.57)}


def test_committed_prototxts_are_the_generators_output(tmp_path):
    from nets.generate import generate
    for path in generate(tmp_path):
        assert path.read_text() == (NETS / path.name).read_text(), path.name


@pytest.mark.parametrize("name", ["squeezenet1_1", "mobilenet_v1", "googlenet", "resnet50"])
def test_nets_have_published_sizes(name):
    net = build_net(read_text_proto(str(NETS / f"{name}.prototxt"), caffe_pb2.NetParameter),
                    TEST, source=name)
    params, macs = PUBLISHED[name]
    assert param_count(net) / 1e6 == pytest.approx(params, rel=0.03)
    assert total_macs(net) / 1e9 == pytest.approx(macs, rel=0.03)
    assert net.output_names == ["prob"] and net.blob_shapes["prob"][:2] == (1, 1000)


def test_quick_suite_writes_markdown_and_json(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                           "--out", str(tmp_path), "--stem", "smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["machine"]["threads"] == 1 and data["machine"]["torch"]
    (inf,) = data["inference"]
    cands = inf["candidates"]
    for key in ("module", "fused", "pycaffe", "opencv", "torchscript", "onnxruntime"):
        assert key in cands, (key, inf["notes"])
        assert cands[key]["ms"] > 0 and cands[key]["max_abs_diff"] < 1e-4, key
    (train,) = data["training"]
    assert {"prototxt/nchw/fp32", "hand/nchw/fp32"} <= set(train["configs"])
    assert train["flops_per_step"] > 0
    md = (tmp_path / "smoke.md").read_text()
    assert "| squeezenet1_1 (1) |" in md and "GFLOP/s" in md and "fp32 peak estimate" in md


def test_peak_flops_estimate():
    from suite.machine import flops_per_cycle
    assert flops_per_cycle({"avx2", "fma"}, "AuthenticAMD")[0] == 32
    assert flops_per_cycle({"avx512f", "avx2", "fma"}, "GenuineIntel")[0] == 64
    assert flops_per_cycle({"avx512f"}, "AuthenticAMD")[0] == 32
    assert flops_per_cycle(set(), "")[0] == 16


@pytest.mark.parametrize("name", ["resnet50", "googlenet"])
def test_training_variant_builds_away_from_224(name):
    from suite.training import train_param
    param = train_param(NETS / f"{name}.prototxt", 2, 64)
    net = build_net(param, 0, source=name)
    assert net.loss_weights == {"loss": 1.0} and net.input_names == ["data", "label"]
    assert "prob" not in net.layer_names


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_gpu_benchmark_without_cuda_says_so_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--nets",
                           "lenet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
