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
        core = ov.Core()
        model = core.read_model(path)
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = {name: self.compiled.input(name) for name in input_names}
        self.outputs = [self.compiled.output(name) for name in output_names]

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer({self.inputs[k]: v for k, v in feed.items()},
                                    share_inputs=True, share_outputs=False)
        return [result[port] for port in self.outputs]


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}

__all__ = ["BackendUnavailable", "OnnxRuntimeRunner", "OpenVinoRunner", "RUNNERS"]
