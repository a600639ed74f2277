"""``tools/export.py``: a deploy net and its weights as a TorchScript or ONNX file for serving.

    tools/export.py --model deploy.prototxt --weights W.caffemodel --format torchscript|onnx OUT
    export --bundle B --format onnx OUT      (labels and preprocessing in the ONNX metadata)

The net is built in the TEST phase, its weights copied in by layer name, and fused for
inference (BatchNorm/Scale/Bias folded into the convolutions, ReLU in place; ``--no-fuse``
keeps every layer). The exported model takes the Input blobs positionally, in the order the
prototxt declares them, and returns the output blobs (those no layer consumes) in Caffe's
alphabetical order; both lists are printed. Input shapes are the prototxt's (a fixed-shape
graph, as Caffe's). Before the file is put under its name, the export is run on random inputs
and compared with the net itself (TorchScript by torch, ONNX by onnxruntime): a maximum
difference above ``--tolerance`` (default 1e-5, relative to the largest output magnitude)
fails the export and leaves no file.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from caffe_compat.commands.common import CliError, add_debug_flag, caffe_argv, run
from caffe_compat.engine import weights as weights_io
from caffe_compat.engine.backends.onnx_export import export_onnx
from caffe_compat.engine.net.frozen import traceable
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.module import NetModule, build_net
from caffe_compat.formats.atomic import atomic_path
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

FORMATS = ("torchscript", "onnx")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--bundle", metavar="B",
                    help="a model bundle folder: its deploy net and weights, and (ONNX) its "
                         "labels and preprocessing as metadata_props caffe.labels, "
                         "caffe.preprocess and caffe.mean")
    ap.add_argument("--model", metavar="deploy.prototxt",
                    help="the net definition (Input layers give the exported input shapes; "
                         "required without --bundle)")
    ap.add_argument("--weights", metavar="W.caffemodel",
                    help="weights to copy in by layer name (default: the prototxt's fillers)")
    ap.add_argument("--format", choices=FORMATS, required=True, help="what to write")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="export every layer as it is (no BatchNorm folding)")
    ap.add_argument("--tolerance", type=float, default=1e-5,
                    help="largest accepted |export - net| relative to the output magnitude")
    ap.add_argument("out", metavar="OUT", help="the file to write (.pt / .onnx)")
    add_debug_flag(ap)


def load_deploy_net(model: str, weights: str | None = None) -> NetModule:
    """A TEST-phase NetModule from a deploy prototxt, with ``weights`` copied in."""
    if not os.path.isfile(model):
        raise CliError(f"--model {model}: no such file")
    net = build_net(read_text_proto(model, caffe_pb2.NetParameter), caffe_pb2.TEST,
                    source=model)
    if weights:
        if not os.path.isfile(weights):
            raise CliError(f"--weights {weights}: no such file")
        weights_io.copy_from(net, weights)
    if not net.input_names:
        raise CliError(f"{model}: the net has no Input layer; export needs a deploy net "
                       "whose inputs are Input blobs (data layers cannot be exported)")
    return net.eval()


def example_inputs(net: NetModule, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*net.blob_shapes[name], generator=gen) for name in net.input_names]


def exportable(net: NetModule, fuse: bool = True) -> torch.nn.Module:
    return fused_for_inference(net, fold=fuse, fuse_relu=fuse).eval()


def export_torchscript(model: torch.nn.Module, inputs: Sequence[torch.Tensor], path) -> None:
    """Trace and freeze (weights become constants); portable, unlike optimize_for_inference.

    Refuses a net with a layer a trace cannot keep (``Layer.traceable``): the file would give
    the example input's output of that layer (SSD's detections) for every input."""
    held = [step for step in getattr(model, "plan", ()) if not traceable(step)]
    if held:
        raise CliError(f"layer '{held[0].name}' ({held[0].fn.type}) computes on the host and "
                       "cannot be traced: a TorchScript file would return the example input's "
                       "output for every input; export the net without it (delete the layer "
                       "from the prototxt) and apply it to the file's outputs")
    with torch.no_grad(), warnings.catch_warnings():
        # Shape arithmetic in the layers is constant for the traced shapes: that is intended.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, tuple(inputs), check_trace=False)
        torch.jit.save(torch.jit.freeze(traced), str(path))


def run_exported(fmt: str, path, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Outputs of the file at ``path`` for ``inputs`` (TorchScript: torch; ONNX: onnxruntime)."""
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            return [t.numpy() for t in loaded(*inputs)]
    try:
        import onnxruntime
    except ImportError:
        raise CliError("checking an ONNX export needs onnxruntime: pip install "
                       "'caffe-compat[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def max_relative_diff(got: Sequence[np.ndarray], want: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().numpy()
        if g.shape != w.shape:
            raise CliError(f"exported output has shape {list(g.shape)}, the net {list(w.shape)}")
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        worst = max(worst, float(np.abs(g - w).max()) / scale if w.size else 0.0)
    return worst


def bundle_metadata(folder) -> dict[str, str]:
    """A bundle's labels, preprocess.json and mean image as ONNX metadata strings (JSON)."""
    import json
    from caffe_compat.data.bundle import Preprocess, bundle_files, read_labels_file
    files = bundle_files(folder)
    pre = Preprocess.load(folder)
    meta = {"caffe.labels": json.dumps(read_labels_file(files["labels"])),
            "caffe.preprocess": json.dumps(pre.spec)}
    mean = pre.transformer.mean
    if mean is not None:
        meta["caffe.mean"] = json.dumps({"shape": list(mean.shape),
                                         "data": [float(v) for v in mean.reshape(-1)]})
    return meta


def add_onnx_metadata(path, metadata: dict[str, str]) -> None:
    import onnx
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def export(model: str, weights: str | None, fmt: str, out: str, fuse: bool = True,
           tolerance: float = 1e-5, metadata: dict[str, str] | None = None) -> float:
    """Write the export to ``out`` after checking it; returns the max relative difference.
    ``metadata`` goes into an ONNX file's metadata_props."""
    if fmt not in FORMATS:
        raise CliError(f"--format {fmt}: known formats are {', '.join(FORMATS)}")
    net = load_deploy_net(model, weights)
    module = exportable(net, fuse)
    inputs = example_inputs(net)
    with torch.no_grad():
        reference = [net(**dict(zip(net.input_names, inputs)))[n] for n in net.output_names]
    folder = Path(out).resolve().parent
    if not folder.is_dir():
        raise CliError(f"{out}: folder {folder} does not exist")
    with atomic_path(out) as tmp:
        try:
            if fmt == "torchscript":
                export_torchscript(module, inputs, tmp)
            else:
                export_onnx(module, inputs, tmp, net.input_names, net.output_names)
                if metadata:
                    add_onnx_metadata(tmp, metadata)
        except CliError:
            raise
        except Exception as exc:  # noqa: BLE001 - tracer/exporter errors come in many types
            text = str(exc).strip().splitlines()
            raise CliError(f"{model}: {fmt} export failed: {type(exc).__name__}: "
                           f"{text[0] if text else ''}") from exc
        diff = max_relative_diff(run_exported(fmt, tmp, inputs), reference)
        if not diff <= tolerance:
            raise CliError(f"{model}: the {fmt} export differs from the net by {diff:.3g} "
                           f"(relative), more than --tolerance {tolerance:g}; nothing written")
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(caffe_argv(sys.argv[1:] if argv is None else argv, ap))
    return run(_main, args, "export")


def _main(args: argparse.Namespace) -> int:
    metadata = None
    if args.bundle:
        if args.model or args.weights:
            raise CliError("--bundle gives the model and weights; leave out --model/--weights")
        from caffe_compat.data.bundle import bundle_files
        files = bundle_files(args.bundle)
        args.model, args.weights = str(files["deploy"]), str(files["weights"])
        metadata = bundle_metadata(args.bundle)
    elif not args.model:
        raise CliError("give --model deploy.prototxt (and --weights), or --bundle B")
    diff = export(args.model, args.weights, args.format, args.out, args.fuse, args.tolerance,
                  metadata)
    net = load_deploy_net(args.model)   # names only; cheap next to the export
    print(f"Wrote {args.out} ({args.format}); inputs: {', '.join(net.input_names)}; "
          f"outputs: {', '.join(net.output_names)}; max relative difference to the net "
          f"{diff:.2g}")
    return 0


__all__ = ["add_arguments", "export", "load_deploy_net", "example_inputs", "exportable",
           "export_torchscript", "export_onnx", "run_exported", "main"]
