"""A repeat of the last engine forward, checked in a few comparisons (pycaffe's fast.py).

A loop of ``net.forward()`` on an engine (onnxruntime, OpenVINO) mostly repeats the call
before it: the same plan, weights, input arrays and shapes. ``FastForward.run`` rebuilds
and compares every part of that on each call (the parameter list, the weights key, the
input shapes against the bound buffers, the output binding, the stale marks), which cost
8-13 us per forward of an MTCNN R-Net whose runtime call takes 65-70 (Zen 4, one thread).

``SteadyCall`` is recorded after an engine forward that needed nothing but the call: its
choice verified, every output written by the runtime straight into its blob, no torch step
after the export, no numpy view of a parameter alive. The next forward takes it when the
same values still hold: the choice object, the parameter tuple (``ParameterWatch`` keeps
one per set of tensors), no numpy hand-out of any parameter since, the parameters' summed
in-place versions, the blob arrays (``BlobState.arrays_replaced``) and the input shapes.
Anything else (a new hand-out, a write through torch, a reshape, a new choice) fails one
of those, and the full path runs, deciding what to do exactly as it always did.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from caffe_compat.engine.net.inference_cache import summed_versions


class SteadyCall:
    """What one engine forward checked, recorded to repeat it (see the module docstring)."""

    __slots__ = ("choice", "params", "aliases", "versions", "handouts", "replaced", "pairs",
                 "call", "state", "skipped", "recompute")

    def __init__(self, fast, plan, params: tuple, versions: int, handouts: int,
                 recompute: Callable[[], None]):
        state = fast.net.blob_state
        self.choice = fast.choice
        self.params, self.versions, self.handouts = params, versions, handouts
        # detached aliases share each parameter's version counter; made together, their
        # objects sit side by side in memory, where the parameters' are scattered: summing
        # the versions after a runtime call (cold caches) took 47 us instead of 69 for
        # UltraFace-slim's 142 parameters
        self.aliases = tuple(p.detach() for p in params)
        self.replaced = state.arrays_replaced
        # (the input blob's host array, the runtime's bound buffer), arrays as of ``replaced``
        self.pairs = tuple((state.host_data(n), bound) for n, bound in plan.input_arrays.items())
        self.call = plan.call.runner.run
        self.state, self.skipped, self.recompute = state, fast._skipped, recompute

    @staticmethod
    def possible(fast, plan) -> bool:
        """Whether the forward just made (``plan``) may be repeated by a SteadyCall."""
        choice = fast.choice         # the call may have sent the net to torch
        return choice is not None and choice.forward is plan and choice.verified \
            and len(plan.plan) == 1 and not fast._copied and not fast._copies \
            and not fast._held and not fast.net.blob_state.lazy

    def holds(self, fast, handouts: int) -> bool:
        """Whether the full path would repeat this very call now."""
        if fast.choice is not self.choice or handouts != self.handouts or \
                self.state.arrays_replaced != self.replaced:
            return False
        params = fast.cache.parameters()
        if params is not self.params or summed_versions(self.aliases) != self.versions:
            return False
        for host, bound in self.pairs:     # numpy lets ``array.shape = ...`` reshape in place
            if host.shape != bound.shape:
                return False
        return True

    def __call__(self) -> None:
        for host, bound in self.pairs:
            np.copyto(bound, host)     # the snapshot a stale read recomputes from, too
        self.call()
        self.state.mark_stale(self.skipped, self.recompute)
