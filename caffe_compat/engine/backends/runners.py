"""ONNX runtimes as inference engines for an exported prefix: onnxruntime and OpenVINO.

Each runner takes the ONNX file, the input and output names, and the thread count, and maps
a dict of float32 numpy inputs to the list of outputs. Both keep float32 arithmetic (OpenVINO
would pick bf16 on an AMX CPU by default: its precision hint is set to f32) and run one
request at a time on ``threads`` threads. onnxruntime's ``session.set_denormal_as_zero`` is
left off: it sets flush-to-zero on the calling thread for good, so every later torch
computation in the process (training included) would flush too; subnormal weights are
already zero (engine/numerics.py). A missing package raises ``BackendUnavailable`` naming the extra to install.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Sequence

import numpy as np


class BackendUnavailable(RuntimeError):
    """The engine's package is not installed (or cannot load the model)."""


class OnnxRuntimeRunner:
    name = "onnxruntime"

    def __init__(self, path: str, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int):
        try:
            import onnxruntime
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed: pip install "
                                     "'caffe-compat[onnxruntime]'") from None
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(path, opts,
                                                    providers=["CPUExecutionProvider"])
        self.output_names = list(output_names)

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


class OpenVinoRunner:
    name = "openvino"

    def __init__(self, path: str, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int):
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("openvino is not installed: pip install "
                                     "'caffe-compat[openvino]'") from None
        self.core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        with _signal_stack_kept():
            self.compiled = self.core.compile_model(self.core.read_model(path), "CPU", config)
            self.request = self.compiled.create_infer_request()
        names = [sorted(port.get_names()) for port in self.compiled.outputs]
        self.output_index = [next(i for i, n in enumerate(names) if name in n)
                             for name in output_names]

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(feed, share_inputs=True)
        return [self.request.get_output_tensor(i).data.copy() for i in self.output_index]



class _StackT(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def _signal_stack_kept():
    """Put the thread's alternate signal stack back after OpenVINO compiles a model.

    Each compiled model installs its own alternate signal stack on the calling thread and
    reinstates the one it found when it is destroyed. Freed in any other order than last-in
    first-out (the garbage collector's), that leaves the thread on a freed stack, and the next
    signal (Ctrl-C, a SIGINT handler of ``caffe train``) kills the process with SIGSEGV. With
    the stack put back, every model finds, and so reinstates, the same valid one."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = _StackT()
        saved = libc.sigaltstack(None, ctypes.byref(before)) == 0
    except (OSError, AttributeError):      # no C library symbols here: nothing to keep
        saved = False
    try:
        yield
    finally:
        if saved:
            if not before.sp:                 # none before: disable whatever was set
                before.flags, before.size = 2, 0            # SS_DISABLE
            libc.sigaltstack(ctypes.byref(before), None)


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}

__all__ = ["BackendUnavailable", "OnnxRuntimeRunner", "OpenVinoRunner", "RUNNERS"]
