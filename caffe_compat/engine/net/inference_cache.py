"""The fast path for an outputs-only forward of a TEST net (the pycaffe hook): a FusedNet
(engine/net/fuse.py) kept while the net's parameters are unchanged, run on the net's device.

- **CPU**: the FusedNet is channels_last (NHWC), faster than NCHW on every net of the benchmark
  suite on the CPUs measured (benchmarks/NOTES.md), each small convolution in the form timed
  fastest here; a net whose layers refuse NHWC tensors falls back to NCHW for good on its
  first call.
- **CUDA**: NCHW (TF32 stays off, so cuDNN's fp32 kernels gain nothing from NHWC), cuDNN
  autotuning on (``configure_cuda``), host inputs copied through pinned memory, and the
  forward captured as a CUDA graph for each input signature and replayed (engine/gpu.py):
  one launch instead of one per layer, which is what a batch-1 forward of a small net spends
  its time on. Graphs are kept for the first ``GRAPHS_KEPT`` signatures; others run eagerly
  (an MTCNN pyramid cycles through a dozen shapes: one graph slot would be re-captured, three
  warm-up runs and a capture, on every forward). A forward that cannot be captured
  (DetectionOutput syncs with the host to size its output) runs eagerly; ``graph_reason``
  says why. ``$CAFFE_COMPAT_CUDA_GRAPHS=0`` runs every forward eagerly (to time the
  difference, or to rule graphs out of a problem).
"""
from __future__ import annotations

from typing import Sequence

import logging
import operator
import os

import torch

from caffe_compat.engine.gpu import (GraphedInference, configure_cuda, host_to_device,
                                     signature)
from caffe_compat.engine.net.frozen import traceable
from caffe_compat.engine.net.fuse import FusedNet, fused_for_inference
from caffe_compat.engine.layers.base import BlobList
from caffe_compat.engine.net.module import NetModule


log = logging.getLogger(__name__)
GRAPHS_ENV = "CAFFE_COMPAT_CUDA_GRAPHS"
_VERSION = operator.attrgetter("_version")
GRAPHS_KEPT = 4          # input signatures given a CUDA graph; any others run eagerly


def summed_versions(tensors) -> int:
    """The tensors' in-place write counters, summed: each only grows, so the sum moves when
    any one does (a tensor replaced by another is the caller's to see, by identity)."""
    return sum(map(_VERSION, tensors))


class ParameterWatch:
    """Lists a net's parameter tensors fast enough to check on every batch-1 forward.

    Holds each layer's ParameterList dict (mutated in place when a blob is shared or
    replaced): reading those is ~20x cheaper than iterating ``layer.blobs``, which goes
    through ``getattr`` per layer and per item (1 ms per forward on GoogLeNet). The list is
    made again only after a layer's ``BlobList`` changed which tensors it holds (the same
    tuple otherwise: callers compare it by identity)."""

    def __init__(self, module: NetModule):
        self._dicts = [layer.blobs._parameters for layer in module.layers]
        # a layer whose blobs are another container is listed on every call
        self._counted = all(isinstance(layer.blobs, BlobList) for layer in module.layers)
        self._seen = -1
        self._params: tuple[torch.Tensor, ...] = ()

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self._seen != BlobList.changes or not self._counted:
            params = tuple(p for d in self._dicts for p in d.values())
            # the count is process-wide (another net was built, say): the same tensors keep
            # the same tuple, so identity still means "nothing replaced"
            if len(params) != len(self._params) or \
                    any(a is not b for a, b in zip(params, self._params)):
                self._params = params
            self._seen = BlobList.changes
        return self._params


class InferenceCache:
    """``outputs(**inputs)`` runs a FusedNet of ``module`` under ``no_grad``, re-fusing
    whenever a parameter was replaced or modified in place since the last fusion.
    ``device``: where the net computes (default: where its first parameter lives)."""

    def __init__(self, module: NetModule, channels_last: bool = True,
                 device: torch.device | None = None):
        self.module = module
        self.parameters = ParameterWatch(module)
        params = self.parameters()
        self.device = torch.device(device) if device is not None else \
            params[0].device if params else torch.device("cpu")
        self.on_cuda = self.device.type == "cuda"
        self.channels_last = channels_last and not self.on_cuda
        self._fused: FusedNet | None = None
        self._versions: tuple = (None, -1)
        self._graph: GraphedInference | None = None      # the last forward's
        self._graphs: dict[tuple, GraphedInference] = {}   # by input signature
        self._past_kept = False      # logged that shapes past GRAPHS_KEPT run eagerly
        self.graphs = os.environ.get(GRAPHS_ENV, "1").strip() != "0"
        if self.on_cuda:
            configure_cuda(self.device)

    def invalidate(self) -> None:
        self._fused = None
        self._graph = None
        self._graphs = {}

    @property
    def graph_reason(self) -> str | None:
        """Why the last CUDA forward ran eagerly; None when it was replayed from a graph."""
        if not self.on_cuda:
            return "not a CUDA net"
        if not self.graphs:
            return f"${GRAPHS_ENV}=0"
        if self._graph is None:
            return f"input shapes past the first {GRAPHS_KEPT}" if self._graphs \
                else "no forward yet"
        return self._graph.reason

    @property
    def fused(self) -> FusedNet:
        return self.fused_for(self.parameters())

    def fused_for(self, params: Sequence[torch.Tensor]) -> FusedNet:
        """The FusedNet, re-fused if ``params`` (``self.parameters()``) changed."""
        # the tensors (one tuple per set: ParameterWatch) and their in-place writes (the
        # versions summed: each only grows, so the sum moves when any does)
        versions = (params, summed_versions(params))
        if self._fused is None or versions[0] is not self._versions[0] or \
                versions[1] != self._versions[1]:
            # forms are timed with CPU kernels: CUDA takes the plain ones (cuDNN chooses)
            self._fused = fused_for_inference(self.module, channels_last=self.channels_last,
                                              measure=not self.on_cuda)
            self._versions = versions
            self._graph = None          # captured with the old fused net's weights
            self._graphs = {}
        return self._fused

    def outputs(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.outputs_for(self.parameters(), inputs)

    def outputs_for(self, params: Sequence[torch.Tensor], inputs: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
        """``outputs(**inputs)`` for a caller that already holds ``self.parameters()``.
        On CUDA the tensors returned are the graph's own outputs, overwritten by the next
        call: copy what you keep."""
        with torch.no_grad():
            if self.on_cuda:
                return self._cuda_outputs(self.fused_for(params), inputs)
            try:
                return self.fused_for(params).outputs(**inputs)
            except RuntimeError:            # a layer that needs NCHW memory: use that from now
                if not self.channels_last:
                    raise
                self.channels_last = False
                self.invalidate()
                try:
                    return self.fused_for(params).outputs(**inputs)
                except RuntimeError as exc:  # fails in NCHW too: the inputs', not the layout's
                    self.channels_last = True
                    self.invalidate()
                    raise exc from None

    def _cuda_outputs(self, fused: FusedNet, inputs: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        tensors = tuple(host_to_device(t, self.device) for t in fused.ordered_inputs(inputs))
        if not self.graphs:
            return dict(zip(fused.output_names, fused(*tensors)))
        key = tuple(signature(tensors))       # shapes, dtypes, devices: all hashable
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= GRAPHS_KEPT:
                if not self._past_kept:
                    log.info("CUDA graphs kept for %d input shapes: others run eagerly",
                             GRAPHS_KEPT)
                    self._past_kept = True
                self._graph = None
                return dict(zip(fused.output_names, fused(*tensors)))
            untraceable = _host_step(fused)
            if untraceable is not None:
                # a graph replays recorded kernels: a layer reading values on the host
                # (DetectionOutput) would replay its example's result, and a capture that
                # fails part-way may leave the stream unusable, so none is attempted
                graph = GraphedInference(fused, tensors, reason=(
                    f"layer '{untraceable.name}' computes on the host or makes a "
                    "data-dependent number of rows"))
            else:
                graph = GraphedInference(fused, tensors)   # a new input shape
            self._graphs[key] = graph
        self._graph = graph
        return dict(zip(fused.output_names, graph(*tensors)))


def _host_step(fused: FusedNet):
    """The first step of ``fused`` a recording cannot replay (``Layer.traceable``), or None."""
    return next((step for step in fused.plan if not traceable(step)), None)


__all__ = ["GRAPHS_ENV", "GRAPHS_KEPT", "InferenceCache", "ParameterWatch", "summed_versions"]
