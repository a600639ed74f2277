"""Process-wide compute mode (pycaffe's set_mode_cpu / set_mode_gpu / set_device).

``set_mode_gpu()`` without CUDA fails as Caffe's CPU-only build does. Scripts written for GPU
machines (FCN's solve.py, SegNet's and SSD's scripts) can run unchanged on the CPU with
``CAFFE_COMPAT_GPU_FALLBACK=cpu`` in the environment: the call then warns once and the
process computes on the CPU.
"""
from __future__ import annotations

import logging
import os

import torch

FALLBACK_VARIABLE = "CAFFE_COMPAT_GPU_FALLBACK"
log = logging.getLogger(__name__)
_use_gpu = False
_device_id = 0
_fallback_told = False


class DeviceError(RuntimeError):
    pass


def set_mode_cpu() -> None:
    global _use_gpu
    _use_gpu = False


def set_mode_gpu() -> None:
    """Compute on CUDA device ``set_device`` chose; fails clearly when CUDA is absent."""
    global _use_gpu, _fallback_told
    if not torch.cuda.is_available():
        if os.environ.get(FALLBACK_VARIABLE, "").strip().lower() == "cpu":
            if not _fallback_told:
                _fallback_told = True
                log.warning("set_mode_gpu(): no CUDA device is available to PyTorch; "
                            "computing on the CPU (%s=cpu)", FALLBACK_VARIABLE)
            _use_gpu = False
            return
        raise DeviceError("set_mode_gpu(): no CUDA device is available to PyTorch "
                          "(CPU-only build or no GPU); use set_mode_cpu(), or set "
                          f"{FALLBACK_VARIABLE}=cpu to run GPU scripts on the CPU")
    _use_gpu = True


def set_device(device_id: int) -> None:
    global _device_id
    if torch.cuda.is_available() and not 0 <= device_id < torch.cuda.device_count():
        raise DeviceError(f"set_device({device_id}): only {torch.cuda.device_count()} CUDA "
                          "device(s) present")
    _device_id = int(device_id)


def device() -> torch.device:
    """The device new nets are placed on."""
    return torch.device(f"cuda:{_device_id}") if _use_gpu else torch.device("cpu")
