"""Speed levers for a built NetModule that leave Caffe's arithmetic alone.

- ``compile_for_training(module)``: the training forward (``forward_loss``) through
  ``torch.compile``. Compilation happens on the first call; if it fails (no C++ compiler for
  inductor, an unsupported Python, an op dynamo cannot trace) the reason is logged once as a
  warning and the net runs eagerly from then on. Such failures come while tracing or
  compiling, before the compiled graph runs; only layers dynamo already split off and ran
  eagerly (data layers, Python layers) could then run twice in that first iteration.
- ``to_channels_last(module)``: 4-D parameters (convolution weights) stored NHWC, which lets
  oneDNN pick its blocked kernels; the net's blobs keep Caffe's NCHW shapes (only strides
  change), and caffemodel writing copies to Caffe's order. Whether it wins is per net and per
  machine: ``benchmarks/run.py`` measures it.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from caffe_compat.engine.net.module import NetModule

log = logging.getLogger(__name__)


class CompiledForward:
    """Callable replacing ``module.forward_loss``: compiled first, eager after a failure."""

    def __init__(self, module: NetModule, backend: str, warn: Callable[[str], None]):
        self.eager = module.forward_loss          # the bound method, kept for the fallback
        self.backend = backend
        self.warn = warn
        self.error: str | None = None
        try:
            self.compiled = torch.compile(self.eager, backend=backend)
        except Exception as exc:  # noqa: BLE001 - torch.compile raises many types
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.error = _root_cause(exc)
        self.compiled = None
        backend = getattr(self.backend, "__name__", self.backend)
        self.warn(f"--compile: torch.compile (backend {backend}) failed ({self.error}); "
                  "training continues without compilation (eager PyTorch)")

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, keep_all: bool = False, **inputs: torch.Tensor):
        if self.compiled is not None:
            try:
                return self.compiled(keep_all, **inputs)
            except Exception as exc:  # noqa: BLE001 - dynamo/inductor errors vary by version
                self._fail(exc)
        return self.eager(keep_all, **inputs)


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause (dynamo wraps a backend's error)."""
    seen = exc
    while True:
        inner = getattr(seen, "inner_exception", None) or seen.__cause__
        if inner is None or inner is seen:
            break
        seen = inner
    text = str(seen).strip()
    return f"{type(seen).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def compile_for_training(module: NetModule, backend: str = "inductor",
                         warn: Callable[[str], None] | None = None) -> CompiledForward:
    """Route ``module.forward_loss`` (what the solver calls) through torch.compile."""
    if isinstance(module.forward_loss, CompiledForward):
        return module.forward_loss
    wrapper = CompiledForward(module, backend, warn or log.warning)
    module.forward_loss = wrapper             # an instance attribute shadows the method
    return wrapper


def uncompile(module: NetModule) -> None:
    """Undo ``compile_for_training``."""
    if isinstance(module.__dict__.get("forward_loss"), CompiledForward):
        del module.forward_loss


def to_channels_last(module: torch.nn.Module) -> int:
    """Store every 4-D parameter channels-last, in place (same tensors, new strides).

    Returns how many were converted. Call before building a solver (its histories copy the
    parameters' layout) or before inference."""
    count = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=torch.channels_last)
                count += 1
    return count


def to_contiguous(module: torch.nn.Module) -> int:
    """Undo ``to_channels_last``: every parameter back to PyTorch's default (NCHW) strides."""
    count = 0
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
                count += 1
    return count


__all__ = ["CompiledForward", "compile_for_training", "uncompile", "to_channels_last",
           "to_contiguous"]
