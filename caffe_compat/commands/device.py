"""Device selection for the command line: Caffe's ``--gpu`` flag and ``solver_mode``, plus
``--precision``.

``--gpu`` takes ``0``, ``0,1`` or ``all``. Without it, a solver file that *sets*
``solver_mode: GPU`` asks for GPU ``device_id`` (default 0), as in ``caffe train``. A GPU request
uses CUDA when PyTorch sees it; otherwise it fails and says why, unless ``--allow-cpu`` was given,
in which case it warns and computes on the CPU.

``--precision fp32|bf16|fp16`` (default fp32, what Caffe computes) runs forward passes under
``torch.autocast``; bf16 also works on the CPU. ``auto`` picks bf16/fp16 only where the
hardware has it natively and a short probe shows it faster (``engine.precision``). fp16 is autocast without loss scaling (Caffe has
none), so tiny gradients can underflow: prefer bf16.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from caffe_compat.engine import distributed, mode
from caffe_compat.engine import precision as precision_choice
from caffe_compat.engine.mode import DeviceError
from caffe_compat.formats import glog

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"                     # resolved per machine by engine.precision
PRECISION_CHOICES = [*PRECISIONS, AUTO]


@dataclass
class DeviceChoice:
    """Where to compute: ``kind`` 'cpu' or 'cuda', the CUDA ids, and the autocast precision."""
    kind: str = "cpu"
    ids: list[int] = field(default_factory=list)
    precision: str = "fp32"

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.ids[0]}") if self.kind == "cuda" else torch.device("cpu")


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build "
                "of torch to use a GPU")
    return (f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU "
            "(no device, driver not loaded, or CUDA_VISIBLE_DEVICES hides it)")


def parse_gpu_flag(flag: str) -> list[int] | str:
    """``"0"`` → [0], ``"0,1"`` → [0, 1], ``"all"`` → "all"; bad values raise DeviceError."""
    flag = flag.strip()
    if flag == "all":
        return "all"
    try:
        ids = [int(x) for x in flag.split(",") if x.strip() != ""]
    except ValueError:
        raise DeviceError(f"--gpu '{flag}': expected device ids such as 0 or 0,1, or 'all'") \
            from None
    if not ids or any(i < 0 for i in ids):
        raise DeviceError(f"--gpu '{flag}': expected device ids such as 0 or 0,1, or 'all'")
    if len(set(ids)) != len(ids):
        raise DeviceError(f"--gpu '{flag}': a device is listed twice")
    return ids


def requested_gpu_flag(gpu_flag: str | None, solver_param=None) -> tuple[str | None, str]:
    """The effective --gpu value and where it came from (Caffe: solver_mode GPU → device_id)."""
    if gpu_flag:
        return gpu_flag, "--gpu"
    if solver_param is not None and solver_param.HasField("solver_mode") and \
            solver_param.solver_mode == solver_param.GPU:
        return str(solver_param.device_id), "solver_mode: GPU"
    return None, ""


def select(gpu_flag: str | None, solver_param=None, allow_cpu: bool = False,
           precision: str = "fp32") -> DeviceChoice:
    """Resolve the device request (see the module docstring); raises DeviceError on failure.
    ``precision`` 'auto' becomes what ``engine.precision.decide_precision`` picks there."""
    if precision not in PRECISIONS and precision != AUTO:
        raise DeviceError(f"--precision '{precision}': known precisions are "
                          f"{', '.join(PRECISION_CHOICES)}")
    choice = _select_device(gpu_flag, solver_param, allow_cpu, precision)
    if choice.precision == AUTO:
        decision = distributed.decided_by_root(
            lambda: precision_choice.decide_precision(choice.device))
        if distributed.is_root():
            glog.info(f"--precision auto: {decision.reason}", "caffe.cpp:214")
        choice.precision = decision.precision
    return choice


def _select_device(gpu_flag: str | None, solver_param, allow_cpu: bool,
                   precision: str) -> DeviceChoice:
    flag, origin = requested_gpu_flag(gpu_flag, solver_param)
    if flag is None:
        return DeviceChoice("cpu", [], precision)
    wanted = parse_gpu_flag(flag)
    if not torch.cuda.is_available():
        what = f"{origin} {flag}" if origin == "--gpu" else f"{origin} (device_id {flag})"
        if not allow_cpu:
            raise DeviceError(f"{what} asks for CUDA, but {_no_cuda_reason()}. Pass --allow-cpu "
                              "to train on the CPU instead" +
                              (", or drop --gpu" if origin == "--gpu" else
                               ", or set solver_mode: CPU"))
        glog.warning(f"{what} asks for CUDA, but {_no_cuda_reason()}; using the CPU "
                     "(--allow-cpu)", "caffe.cpp:197")
        return DeviceChoice("cpu", [], precision)
    count = torch.cuda.device_count()
    ids = list(range(count)) if wanted == "all" else wanted
    bad = [i for i in ids if i >= count]
    if bad:
        raise DeviceError(f"{origin} {flag}: no CUDA device {', '.join(map(str, bad))} "
                          f"({count} present: ids 0..{count - 1})")
    return DeviceChoice("cuda", ids, precision)


def apply(choice: DeviceChoice) -> None:
    """Set the process-wide compute mode (what ``caffe.set_mode_gpu``/``set_device`` do) and
    log it as caffe.cpp does."""
    if choice.kind == "cuda":
        mode.set_device(choice.ids[0])
        mode.set_mode_gpu()
        torch.cuda.set_device(choice.ids[0])
        glog.info(f"Using GPUs {', '.join(map(str, choice.ids))}", "caffe.cpp:205")
        for i in choice.ids:
            glog.info(f"GPU {i}: {torch.cuda.get_device_name(i)}", "caffe.cpp:210")
    else:
        mode.set_mode_cpu()
        glog.info("Use CPU.", "caffe.cpp:197")
    if choice.precision != "fp32":
        glog.info(f"Computing forward passes under autocast({choice.precision}) on "
                  f"{choice.device.type}", "caffe.cpp:215")
        if choice.precision == "fp16":
            glog.warning("fp16 autocast runs without loss scaling (as Caffe has none): small "
                         "gradients may underflow to 0; bf16 keeps fp32's range",
                         "caffe.cpp:216")


def autocast(choice: DeviceChoice):
    """A context manager: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    dtype = PRECISIONS[choice.precision]
    if dtype is None:
        return contextlib.nullcontext()
    # cache_enabled=False: autocast keeps one reduced copy of each weight until the outermost
    # context exits, and the solver updates the float32 weights in place inside it. With the
    # cache, every forward of a run wrapped in one context used the first step's copies: the
    # convolution and InnerProduct weights the net computed with never changed.
    return torch.autocast(device_type=choice.device.type, dtype=dtype, cache_enabled=False)


_PROPERTIES = [   # (label as caffe device_query prints it, torch attribute, formatter)
    ("Major revision number", "major", str),
    ("Minor revision number", "minor", str),
    ("Name", "name", str),
    ("Total global memory", "total_memory", str),
    ("Total shared memory per block", "shared_memory_per_block", str),
    ("Registers per multiprocessor", "regs_per_multiprocessor", str),
    ("Warp size", "warp_size", str),
    ("Maximum threads per multiprocessor", "max_threads_per_multi_processor", str),
    ("Number of multiprocessors", "multi_processor_count", str),
    ("L2 cache size", "L2_cache_size", str),
    ("Integrated", "is_integrated", lambda v: "Yes" if v else "No"),
    ("Multi-GPU board", "is_multi_gpu_board", lambda v: "Yes" if v else "No"),
]


def device_query(ids: list[int] | str | None = None) -> list[str]:
    """Caffe's ``device_query`` lines for the given ids (default: every device).

    Raises DeviceError when there is no CUDA device, saying why.
    """
    if not torch.cuda.is_available():
        raise DeviceError(f"no CUDA device: {_no_cuda_reason()}")
    count = torch.cuda.device_count()
    ids = list(range(count)) if ids in (None, "all") else ids
    lines = []
    for i in ids:
        if i >= count:
            raise DeviceError(f"no CUDA device {i} ({count} present: ids 0..{count - 1})")
        props = torch.cuda.get_device_properties(i)
        lines.append(f"{'Device id:':<31}{i}")
        for label, attr, fmt in _PROPERTIES:
            value = getattr(props, attr, None)
            if value is not None:
                lines.append(f"{label + ':':<31}{fmt(value)}")
    return lines


__all__ = ["DeviceChoice", "DeviceError", "PRECISIONS", "PRECISION_CHOICES", "AUTO", "parse_gpu_flag", "select", "apply",
           "autocast", "device_query", "requested_gpu_flag"]
