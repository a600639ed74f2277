"""A torch module as an ONNX file: the one ONNX export (tools/export.py and the backends)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Sequence

import torch


def export_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor], path,
                input_names: list[str], output_names: list[str], dynamo: bool = True,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """``model(*inputs)`` as ONNX, weights inside the file: by torch's dynamo exporter, or
    (``dynamo=False``) by its TorchScript tracer, 10-40x quicker (0.2 s against 2-8 s for an
    MTCNN O-Net here), which the engines use at load. ``dynamic_axes`` (input name -> {axis:
    symbol}) leaves those axes free in the graph (the tracer's form of it)."""
    # "torchvision is not installed", the optimizer's pass-by-pass INFO lines: not ours
    quiet = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration",
                                            "onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _stdout_silenced():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs), str(path), input_names=input_names,
                              output_names=output_names, dynamo=dynamo,
                              **({"dynamic_axes": dynamic_axes} if dynamic_axes else {}),
                              **({"external_data": False} if dynamo else {}), verbose=False)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


@contextlib.contextmanager
def _stdout_silenced():
    """File descriptor 1 sent to /dev/null. A failed TorchScript export prints its whole IR
    graph to C++'s stdout (torch 2.13 reads its log switch, a function, as "enabled"): in
    the middle of a command's output. The failure still reaches the caller as an error."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):   # no stdout descriptor: nothing to guard
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


__all__ = ["export_onnx"]
