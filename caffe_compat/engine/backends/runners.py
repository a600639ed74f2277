"""ONNX runtimes as inference engines for an exported prefix: onnxruntime and OpenVINO.

Each runner loads the ONNX file for fixed input and output shapes and *binds* them once to
float32 numpy buffers it owns: ``inputs`` (the runtime reads them) and ``outputs`` (it
writes them). A call is then ``run()`` and nothing else: onnxruntime through its IO binding,
OpenVINO through one infer request whose input and output tensors share those buffers. The
per-call work of ``session.run(names, {name: array})`` (a feed dict, output arrays allocated
and returned) and of ``request.infer(inputs)`` (a result dict, outputs copied) goes: on a
batch-1 MTCNN R-Net OpenVINO's bound request ran in 47-49 us against 67 us for
``infer({0: x}, share_inputs=True)``, onnxruntime's binding 99-114 us against 112-125 us
for ``session.run`` (this 2-core Xeon, alternating).

Both keep float32 arithmetic (OpenVINO would pick bf16 on an AMX CPU by default: its
precision hint is set to f32, and ``settings`` reads back what the compiled model uses) and
run one request at a time on ``threads`` threads (OpenVINO: the LATENCY hint, one stream).
``openvino-bf16`` is OpenVINO with the bf16 hint: a candidate of ``precision="auto"`` only
(engine.py), on CPUs with native bf16, where it ran 1.2-2.0x OpenVINO's f32 speed (a 2-core
AMD EPYC, Zen 4 with AVX512-BF16: ResNet-50 36 against 73 ms, batch 1, one thread).
onnxruntime's ``session.set_denormal_as_zero`` is left off: it sets flush-to-zero on the
calling thread for good, so every later torch computation in the process (training
included) would flush too; subnormal weights are already zero (engine/numerics.py). A
missing package raises ``BackendUnavailable`` naming the extra to install.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
from functools import partial
from typing import Sequence

import numpy as np

Shapes = Sequence[Sequence[int]]


class BackendUnavailable(RuntimeError):
    """The engine's package is not installed (or cannot load the model)."""


def _buffers(shapes: Shapes) -> list[np.ndarray]:
    return [np.zeros(tuple(int(d) for d in s), np.float32) for s in shapes]


class OnnxRuntimeRunner:
    name = "onnxruntime"
    # serves a shape-generic export at any input shape (``rebound``: an IO binding per shape)
    shape_generic = True

    def __init__(self, path: str, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int, input_shapes: Shapes, output_shapes: Shapes):
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
        self._read = {i.name for i in self.session.get_inputs()}   # an unread input: absent
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.settings = f"{threads} intra-op thread(s), all graph optimizations"
        self._bind(input_shapes, output_shapes)

    def _bind(self, input_shapes: Shapes, output_shapes: Shapes) -> None:
        self.inputs, self.outputs = _buffers(input_shapes), _buffers(output_shapes)
        self.binding = self.session.io_binding()
        for name, array in zip(self.input_names, self.inputs):
            if name in self._read:
                self.binding.bind_input(name, "cpu", 0, np.float32, array.shape,
                                        array.ctypes.data)
        for index, array in enumerate(self.outputs):
            self.bind_output(index, array)
        self.run = _bare_run(self.session, self.binding)

    def rebound(self, input_shapes: Shapes, output_shapes: Shapes) -> "OnnxRuntimeRunner":
        """A runner over the same session (a shape-generic export) with buffers and an IO
        binding of its own for these shapes; ``self`` is left as it was."""
        other = copy.copy(self)
        other._bind(input_shapes, output_shapes)
        return other

    def output_shapes(self, input_shapes: Shapes) -> list[tuple]:
        """The output shapes of a shape-generic export at ``input_shapes`` (one run)."""
        feed = {n: a for n, a in zip(self.input_names, _buffers(input_shapes))
                if n in self._read}
        return [a.shape for a in self.session.run(self.output_names, feed)]

    def bind_output(self, index: int, array: np.ndarray) -> None:
        """Output ``index`` is written into ``array`` (float32, C-contiguous, its shape)."""
        self.binding.bind_output(self.output_names[index], "cpu", 0, np.float32, array.shape,
                                 array.ctypes.data)
        self.outputs[index] = array



def _bare_run(session, binding):
    """``session.run_with_iobinding(binding)`` without its two Python wrappers per call
    (the C++ session's own call, where this onnxruntime exposes it)."""
    sess, bound = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    if sess is None or bound is None or not hasattr(sess, "run_with_iobinding"):
        return lambda: session.run_with_iobinding(binding)
    return partial(sess.run_with_iobinding, bound, None)


class OpenVinoRunner:
    name = "openvino"
    # a shape-generic export serves other shapes through a new infer request per shape
    # (``rebound``): rebinding one request's tensors to other shapes corrupted the heap in
    # OpenVINO 2026.4's CPU plugin (an MTCNN P-Net at batch 2, then other image sizes);
    # a request per shape ran 1500 random shapes clean under MALLOC_CHECK_=3
    shape_generic = True
    precision_hint = "f32"

    def __init__(self, path: str, input_names: Sequence[str], output_names: Sequence[str],
                 threads: int, input_shapes: Shapes, output_shapes: Shapes):
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("openvino is not installed: pip install "
                                     "'caffe-compat[openvino]'") from None
        self.core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": self.precision_hint,
                  "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        with _signal_stack_kept():
            self.compiled = self.core.compile_model(self.core.read_model(path), "CPU", config)
        self.settings = ", ".join(f"{key} {_text(self.compiled.get_property(key))}"
                                  for key in config)
        ports = {n: i for i, port in enumerate(self.compiled.inputs) for n in port.get_names()}
        # an input no layer reads is no port of the compiled model
        self._in_ports = [ports.get(name) for name in input_names]
        ports = {n: i for i, port in enumerate(self.compiled.outputs) for n in port.get_names()}
        self._ports = [ports[name] for name in output_names]
        self._tensor = ov.Tensor
        self._bind(input_shapes, output_shapes)

    def _bind(self, input_shapes: Shapes, output_shapes: Shapes) -> None:
        """A new infer request whose tensors share new buffers of these shapes."""
        with _signal_stack_kept():
            self.request = self.compiled.create_infer_request()
        self.inputs, self.outputs = _buffers(input_shapes), _buffers(output_shapes)
        for port, array in zip(self._in_ports, self.inputs):
            if port is not None:
                self.request.set_input_tensor(port, self._tensor(array, shared_memory=True))
        for index, array in enumerate(self.outputs):
            self.bind_output(index, array)
        self.run = _bare_infer(self.request)

    def rebound(self, input_shapes: Shapes, output_shapes: Shapes) -> "OpenVinoRunner":
        """A runner over the same compiled model (a shape-generic export) with a request
        and buffers of its own for these shapes; ``self`` is left as it was."""
        other = copy.copy(self)
        other._bind(input_shapes, output_shapes)
        return other

    def output_shapes(self, input_shapes: Shapes) -> list[tuple]:
        """The output shapes of a shape-generic export at ``input_shapes`` (one run)."""
        request = self.compiled.create_infer_request()
        feed = {port: a for port, a in zip(self._in_ports, _buffers(input_shapes))
                if port is not None}
        result = request.infer(feed)
        return [tuple(result[port].shape) for port in self._ports]

    def bind_output(self, index: int, array: np.ndarray) -> None:
        """Output ``index`` is written into ``array`` (float32, C-contiguous, its shape)."""
        self.request.set_output_tensor(self._ports[index], self._tensor(array,
                                                                        shared_memory=True))
        self.outputs[index] = array


class OpenVinoBf16Runner(OpenVinoRunner):
    """OpenVINO computing in bf16 (its own conversions, accumulations in f32)."""
    name = "openvino-bf16"
    precision_hint = "bf16"


def _text(value) -> str:
    """A compiled model's property as OpenVINO spells it (``f32``, not ``<Type: ...>``)."""
    name = getattr(value, "get_type_name", None)
    return name() if callable(name) else str(value)


def _bare_infer(request):
    """The request's infer on its bound tensors. The binding's own ``infer`` (pybind) with
    no inputs and shared outputs; ``InferRequest.infer``'s Python wrapper would dispatch an
    empty input dict and build a result dict of copies on every call."""
    base = next((cls.__dict__["infer"] for cls in type(request).__mro__[1:]
                 if "infer" in cls.__dict__), None)
    if base is None:                              # another OpenVINO layout: the public call
        return request.infer
    return partial(base, request, {}, True, False)


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
# reduced-precision runners: never requested by name, offered by ``precision="auto"``; each
# maps to the engine a caller names to get it
REDUCED_RUNNERS = {"openvino-bf16": OpenVinoBf16Runner}
REDUCED_OF = {"openvino-bf16": "openvino"}


def runner_class(name: str):
    """The runner of engine ``name``, full or reduced precision."""
    return RUNNERS.get(name) or REDUCED_RUNNERS[name]


__all__ = ["BackendUnavailable", "OnnxRuntimeRunner", "OpenVinoRunner", "OpenVinoBf16Runner",
           "RUNNERS", "REDUCED_RUNNERS", "REDUCED_OF", "runner_class"]
