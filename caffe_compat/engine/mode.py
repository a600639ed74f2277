"""Process-wide compute mode (pycaffe's set_mode_cpu / set_mode_gpu / set_device)."""
from __future__ import annotations

import torch

_use_gpu = False
_device_id = 0


class DeviceError(RuntimeError):
    pass


def set_mode_cpu() -> None:
    global _use_gpu
    _use_gpu = False


def set_mode_gpu() -> None:
    """Compute on CUDA device ``set_device`` chose; fails clearly when CUDA is absent."""
    global _use_gpu
    if not torch.cuda.is_available():
        raise DeviceError("set_mode_gpu(): no CUDA device is available to PyTorch "
                          "(CPU-only build or no GPU); use set_mode_cpu()")
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
