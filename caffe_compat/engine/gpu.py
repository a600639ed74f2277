"""CUDA-only speed paths, each with a CPU fallback so callers need no device checks.

- ``configure_cuda(device)``: ``cudnn.benchmark`` (cuDNN times its algorithms once per shape
  and keeps the fastest; right for Caffe nets, whose shapes are fixed) and TF32 off, because
  TF32 matmuls keep 10 mantissa bits and Caffe's float32 results would drift;
- ``host_to_device(t, device)``: a host tensor copied through pinned memory with
  ``non_blocking=True`` so the copy overlaps compute; a no-op on the CPU;
- ``GraphedInference(fn, inputs)``: a static-shape forward captured once as a CUDA graph and
  replayed (one launch instead of one per kernel: the win for small batches); eager on the
  CPU, for other shapes, or when capture fails, with ``reason`` saying why.

Autocast (fp16/bf16) is ``commands.device.autocast`` and ``engine.precision`` picks it.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def configure_cuda(device: torch.device | str, benchmark: bool = True) -> bool:
    """Set cuDNN autotuning for ``device``; returns False (and changes nothing) off CUDA."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return True


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; CPU→CUDA copies go through pinned memory without blocking."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def graph_unsupported_reason(inputs: Sequence[torch.Tensor]) -> str | None:
    """Why ``inputs`` cannot drive a CUDA graph, or None when they can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not inputs:
        return "the net has no inputs to capture"
    off = [i for i, t in enumerate(inputs) if t.device.type != "cuda"]
    if off:
        return f"input(s) {off} are not on a CUDA device"
    return None


def signature(inputs: Sequence[torch.Tensor]) -> list[tuple]:
    """What a captured graph is specific to: each input's shape, dtype and device."""
    return [(t.shape, t.dtype, t.device) for t in inputs]


class GraphedInference:
    """``fn(*inputs)`` replayed from a CUDA graph for inputs of the captured shapes.

    The returned tensors are the graph's static outputs: the next call overwrites them
    (clone to keep them). Any other shape, dtype or device runs ``fn`` eagerly."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]],
                 example_inputs: Sequence[torch.Tensor], warmup: int = 3,
                 reason: str | None = None):
        """``reason``: the caller knows ``fn`` cannot be captured (it runs eagerly)."""
        self.fn = fn
        self.graph = None
        self.signature = signature(example_inputs)
        self.reason = reason or graph_unsupported_reason(example_inputs)
        if self.reason is None:
            try:
                self._capture(list(example_inputs), warmup)
            except RuntimeError as exc:   # a host sync (DetectionOutput's .item()) and the like
                self.graph = None
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                self.reason = f"capture failed: {first}"
        if self.reason:
            log.info("CUDA graph not used (%s): running eagerly", self.reason)

    def _capture(self, inputs: list[torch.Tensor], warmup: int) -> None:
        self.static_inputs = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):           # lets cuDNN autotune outside the capture
                self.fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.static_outputs = self.fn(*self.static_inputs)
        self.graph = graph

    def serves(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether ``inputs`` have the shapes this object was made for (replayed, or run
        eagerly where capture was impossible: no point trying again for them)."""
        return signature(inputs) == self.signature

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether a call with ``inputs`` replays the graph."""
        return self.graph is not None and self.serves(inputs)

    def __call__(self, *inputs: torch.Tensor):
        if not self.matches(inputs):
            with torch.no_grad():
                return self.fn(*inputs)
        for static, t in zip(self.static_inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return self.static_outputs


__all__ = ["configure_cuda", "host_to_device", "graph_unsupported_reason", "GraphedInference",
           "signature"]
