"""What the suite ran on, and the CPU's fp32 peak FLOP rate estimated from its description.

Peak = cores x clock x fp32 FLOPs per cycle per core, where FLOPs per cycle = FMA pipes x
vector lanes x 2 (an FMA is a multiply and an add). Assumed from the flags and the vendor:
AVX-512 on Intel: 2 x 16 x 2 = 64; AVX-512 on AMD (Zen 4 runs it on 256-bit pipes) and
AVX2+FMA (Haswell..., Zen 1-3): 2 x 8 x 2 = 32; otherwise SSE: 2 x 4 x 2 = 16. The clock is
lscpu's "CPU max MHz" when it reports one, else half the BogoMIPS (the TSC rate on x86 VMs),
else /proc/cpuinfo's "cpu MHz". Turbo and AVX frequency offsets are ignored, so the peak is
an estimate good to about +-25%.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess

import torch

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                     "amx_tile", "f16c")


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines()
                                              if ":" in line)}


def _cpuinfo_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", f.read(), re.M)
            return float(m.group(1)) if m else None
    except OSError:
        return None


def clock_ghz(info: dict[str, str]) -> tuple[float | None, str]:
    if info.get("CPU max MHz"):
        return float(info["CPU max MHz"]) / 1000, "lscpu CPU max MHz"
    if info.get("BogoMIPS"):
        return float(info["BogoMIPS"]) / 2000, "BogoMIPS / 2"
    mhz = _cpuinfo_mhz()
    return (mhz / 1000, "/proc/cpuinfo cpu MHz") if mhz else (None, "unknown")


def flops_per_cycle(flags: set[str], vendor: str) -> tuple[int, str]:
    if "avx512f" in flags and "Intel" in vendor:
        return 64, "2 FMA pipes x 16 fp32 lanes (AVX-512) x 2"
    if "avx512f" in flags or ("avx2" in flags and "fma" in flags):
        return 32, "2 FMA pipes x 8 fp32 lanes (256-bit) x 2"
    return 16, "2 pipes x 4 fp32 lanes (SSE) x 2"


def describe() -> dict:
    """The machine block of the results: CPU, flags, clock, peak, torch, threads, load."""
    info = lscpu()
    flags = set(info.get("Flags", "").split())
    cores = torch.get_num_threads()
    ghz, clock_source = clock_ghz(info)
    per_cycle, per_cycle_how = flops_per_cycle(flags, info.get("Vendor ID", ""))
    peak = cores * ghz * per_cycle if ghz else None
    return {
        "cpu": info.get("Model name", platform.processor() or "unknown"),
        "vendor": info.get("Vendor ID", ""), "family": info.get("CPU family", ""),
        "model": info.get("Model", ""), "cpus": os.cpu_count(),
        "flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
        "clock_ghz": ghz, "clock_source": clock_source,
        "fp32_flops_per_cycle": per_cycle, "flops_per_cycle_how": per_cycle_how,
        "peak_fp32_gflops": peak, "peak_how": f"{cores} threads x {ghz and round(ghz, 3)} GHz x "
                                              f"{per_cycle} FLOP/cycle ({per_cycle_how})",
        "torch": torch.__version__, "threads": cores, "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }
