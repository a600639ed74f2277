"""Inference at a fixed batch: the same random weights through every way of running a net.

Candidates (all fp32, same threads): ``module`` (NetModule.forward), ``fused``
(engine.net.fuse), ``fused_cl`` (fused, channels_last weights and input; ``fused_cl_direct``
the same with $CAFFE_COMPAT_WINOGRAD=off, the Winograd lever's baseline), ``fused_forms``
(fused_cl with each small convolution in the form timed fastest, engine/net/conv_forms.py:
what pycaffe's torch engine runs), ``frozen``
(fused + torch.jit freeze/optimize_for_inference), ``pycaffe`` (caffe_compat.Net.forward
with the input written to its blob), ``torchscript`` and ``onnxruntime`` (the files
tools/export.py writes, run by torch and by onnxruntime) and ``opencv`` (cv2.dnn reading the
same prototxt and caffemodel). Each output is compared with ``module``'s (max abs diff).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from caffe_compat import pycaffe
from caffe_compat.commands import export as exporting
from caffe_compat.engine import weights as weights_io
from caffe_compat.engine.layers.base import TEST
from caffe_compat.engine.net.frozen import frozen_for_inference
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

from .timing import alternate


def deploy_param(path: Path, batch: int, size: int | None) -> caffe_pb2.NetParameter:
    """The deploy prototxt with the Input shape set to ``batch`` (and ``size`` x ``size``)."""
    param = read_text_proto(str(path), caffe_pb2.NetParameter)
    dims = param.layer[0].input_param.shape[0].dim
    dims[0] = batch
    if size:
        dims[2] = dims[3] = size
    return param


def randomize_statistics(net: NetModule, seed: int = 0) -> None:
    """BatchNorm statistics as after training (the fillers leave them 0), so folding matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            if layer.type == "BatchNorm":
                c = layer.channels
                layer.blobs[0].copy_(torch.randn(c, generator=gen) * 0.1)
                layer.blobs[1].copy_(0.5 + torch.rand(c, generator=gen))
                layer.blobs[2].fill_(1.0)


def deploy_files(name: str, prototxt: Path, batch: int, size: int | None, work: Path
                 ) -> tuple[Path, Path, NetModule]:
    """The deploy prototxt at ``batch`` (and ``size``) and a caffemodel of seeded random
    weights with trained-looking BatchNorm statistics, in ``work``; and the NetModule."""
    torch.manual_seed(0)
    param = deploy_param(prototxt, batch, size)
    deploy = work / f"{name}.prototxt"
    deploy.write_text(str(param))
    net = build_net(param, caffe_pb2.TEST, source=str(deploy)).eval()
    randomize_statistics(net)
    caffemodel = work / f"{name}.caffemodel"
    weights_io.save(net, str(caffemodel))
    return deploy, caffemodel, net


def _opencv_runner(prototxt: Path, caffemodel: Path, x: np.ndarray, threads: int,
                   out: str | None = None):
    """OpenCV DNN's forward; of the blob ``out`` where given (a plain ``forward()`` returns
    the last layer's, another output on multi-output nets)."""
    import cv2
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

    def run():
        net.setInput(x)
        return net.forward() if out is None else net.forward(out)
    return run


def _openvino_runner(path: Path, x: np.ndarray, threads: int, hint: str = "f32"):
    """OpenVINO on the same ONNX file at precision ``hint`` (default fp32: its default on an
    AMX CPU would be bf16); ``.precision`` on the call is what the compiled model uses."""
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    request = compiled.create_infer_request()

    def run():
        return request.infer({0: x}, share_inputs=True)[compiled.output(0)]
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    run.precision = getattr(used, "get_type_name", lambda: str(used))()
    return run


def _onnx_runner(path: Path, x: np.ndarray, threads: int):
    import onnxruntime
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})[0]


def build_candidates(name: str, prototxt: Path, batch: int, size: int | None, work: Path,
                     skip: set[str], engine: str | None = None) -> tuple[dict, dict, NetModule]:
    """(callables returning the first output, notes, the reference NetModule)."""
    deploy, caffemodel, net = deploy_files(name, prototxt, batch, size, work)
    out_name = net.output_names[0]
    x = torch.randn(*net.blob_shapes["data"], generator=torch.Generator().manual_seed(1))
    xn = x.numpy()
    threads = torch.get_num_threads()
    fused = fused_for_inference(net)
    cands, notes = {}, {}
    cands["module"] = lambda: net(data=x)[out_name]
    cands["fused"] = lambda: fused.outputs(data=x)[out_name]
    if "fused_cl" not in skip:
        fused_cl = fused_for_inference(net, channels_last=True)
        cands["fused_cl"] = lambda: fused_cl(x)[0]
        if "fused_cl_direct" not in skip:
            cands["fused_cl_direct"] = _without_winograd(lambda: fused_cl(x)[0])
    if "fused_forms" not in skip:
        fused_forms = fused_for_inference(net, channels_last=True, measure=True)
        cands["fused_forms"] = lambda: fused_forms(x)[0]
    _add_frozen(cands, notes, fused, x, skip)
    if "pycaffe" not in skip:
        pnet = pycaffe.Net(str(deploy), str(caffemodel), TEST)

        def pycaffe_forward():
            pnet.blobs["data"].data[...] = xn
            return pnet.forward()[out_name]
        cands["pycaffe"] = pycaffe_forward
    if engine:
        _add_engine(cands, notes, deploy, caffemodel, xn, out_name, engine)
    _add_exported(cands, notes, net, deploy, caffemodel, work, name, xn, threads, skip)
    if "opencv" not in skip:
        try:
            cands["opencv"] = _opencv_runner(deploy, caffemodel, xn, threads)
        except Exception as exc:  # noqa: BLE001 - report, don't abort the suite
            notes["opencv"] = f"failed: {str(exc).splitlines()[0][:200]}"
    return cands, notes, net


def _add_engine(cands, notes, deploy, caffemodel, xn, out_name, engine) -> None:
    """``pycaffe_<engine>``: net.forward() of a Net built with ``engine=`` (auto measures)."""
    net = pycaffe.Net(str(deploy), str(caffemodel), TEST, engine=engine)

    def forward():
        net.blobs["data"].data[...] = xn
        return net.forward()[out_name]
    forward()                                  # the first call checks the engine's outputs
    cands[f"pycaffe_{engine}"] = forward
    notes[f"pycaffe_{engine}"] = f"engine {net.engine}"


def _without_winograd(run):
    """``run`` with every convolution on the direct kernel (the Winograd lever's baseline)."""
    def direct():
        before = os.environ.get("CAFFE_COMPAT_WINOGRAD")
        os.environ["CAFFE_COMPAT_WINOGRAD"] = "off"
        try:
            return run()
        finally:
            if before is None:
                del os.environ["CAFFE_COMPAT_WINOGRAD"]
            else:
                os.environ["CAFFE_COMPAT_WINOGRAD"] = before
    return direct


def _add_frozen(cands, notes, fused, x, skip) -> None:
    if "frozen" in skip:
        return
    try:
        frozen = frozen_for_inference(fused, [x])
        cands["frozen"] = lambda: frozen(x)[0]
    except RuntimeError as exc:
        notes["frozen"] = str(exc)[:200]


def _add_exported(cands, notes, net, deploy, caffemodel, work, name, xn, threads, skip) -> None:
    x = torch.from_numpy(xn)
    for fmt, key in (("torchscript", "torchscript"), ("onnx", "onnxruntime")):
        if key in skip and (fmt == "torchscript" or "openvino" in skip):
            continue
        out = work / f"{name}.{'pt' if fmt == 'torchscript' else 'onnx'}"
        try:
            exporting.export(str(deploy), str(caffemodel), fmt, str(out))
        except Exception as exc:  # noqa: BLE001
            notes[key] = f"export failed: {str(exc).splitlines()[0][:200]}"
            continue
        if fmt == "torchscript":
            loaded = torch.jit.load(str(out))
            cands[key] = lambda loaded=loaded: loaded(x)[0]
        else:
            if key not in skip:
                cands[key] = _onnx_runner(out, xn, threads)
            if "openvino" not in skip:
                try:
                    cands["openvino"] = _openvino_runner(out, xn, threads)
                except ImportError:
                    notes["openvino"] = "not installed"


def _as_numpy(value) -> np.ndarray:
    return value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def bench_net(name: str, prototxt: Path, batch: int, size: int | None, iters: int,
              rounds: int, skip: set[str], engine: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp, torch.no_grad():
        cands, notes, net = build_candidates(name, prototxt, batch, size, Path(tmp), skip,
                                             engine)
        ref = _as_numpy(cands["module"]())
        diffs = {}
        for key, fn in cands.items():
            got = _as_numpy(fn())
            # detections: another engine may keep a different number of boxes
            diffs[key] = float(np.abs(got.reshape(ref.shape) - ref).max()) \
                if got.size == ref.size else float("inf")
        times = alternate(cands, iters, rounds)
    base = times["opencv"]["ms"] if "opencv" in times else None
    rows = {}
    for key, t in times.items():
        rows[key] = {**t, "max_abs_diff": diffs[key],
                     "speed_vs_opencv": (base / t["ms"]) if base else None}
    return {"net": name, "batch": batch, "input": list(net.blob_shapes["data"]),
            "candidates": rows, "notes": notes}
