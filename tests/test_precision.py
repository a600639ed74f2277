"""--precision auto (engine/precision.py): bf16/fp16 only where native and measured faster."""
import pytest
import torch

from caffe_compat.commands import device as devices
from caffe_compat.engine import precision


def test_cpu_flags_parses_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


def _never(device, name):
    raise AssertionError("no probe may run without native bf16")


@pytest.mark.parametrize("flags", [set(), {"avx2", "fma", "avx512f"}])
def test_cpu_without_native_bf16_is_fp32_without_probing(flags):
    d = precision.decide_precision("cpu", flags=flags, probe=_never)
    assert d.precision == "fp32" and "AMX or AVX512-BF16" in d.reason


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_native_bf16_chosen_only_when_the_probe_is_faster(flag):
    fast = precision.decide_precision("cpu", flags={flag}, probe=lambda d, p: 2.08)
    assert fast.precision == "bf16" and fast.speedup == 2.08 and "2.08x" in fast.reason
    slow = precision.decide_precision("cpu", flags={flag}, probe=lambda d, p: 0.69)
    assert slow.precision == "fp32" and "0.69x" in slow.reason
    marginal = precision.decide_precision("cpu", flags={flag}, probe=lambda d, p: 1.05)
    assert marginal.precision == "fp32"


def test_failing_probe_keeps_fp32():
    def broken(device, name):
        raise RuntimeError("no bf16 kernel\nmore")
    d = precision.decide_precision("cpu", flags={"amx_bf16"}, probe=broken)
    assert d.precision == "fp32" and "no bf16 kernel" in d.reason


def test_cuda_candidate_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.candidates(torch.device("cuda")) == ["bf16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.candidates(torch.device("cuda")) == ["fp16"]
    assert precision.choose_precision("cuda", probe=lambda d, p: 3.0) == "fp16"


def test_probe_measures_a_real_ratio():
    ratio = precision.probe_speedup(torch.device("cpu"), "bf16", repeats=1)
    assert ratio > 0 and ratio != float("inf")


def test_device_select_resolves_auto(monkeypatch):
    monkeypatch.setattr(precision, "decide_precision",
                        lambda device: precision.PrecisionDecision("bf16", "bf16: test"))
    assert devices.select(None, precision="auto").precision == "bf16"
    monkeypatch.setattr(precision, "decide_precision",
                        lambda device: precision.PrecisionDecision("fp32", "fp32: test"))
    assert devices.select(None, precision="auto").precision == "fp32"
    with pytest.raises(devices.DeviceError, match="auto"):
        devices.select(None, precision="fp8")
