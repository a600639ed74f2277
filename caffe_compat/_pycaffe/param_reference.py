"""The parameter values a fused net or an engine export was made from (pycaffe's fast.py).

A numpy hand-out of a parameter (``net.params[...][i].data``) may be a read or an edit: numpy
writes bypass torch's version counter. Keeping a copy of the values tells the two apart, so
reading the weights between forwards costs neither a fusion nor the engine.
"""
from __future__ import annotations

from typing import Sequence

import torch

# Nets whose parameters hold at most this many values keep a copy of the values each fused
# net and export was made from: a numpy hand-out that only read them is then told from an
# edit (else every hand-out re-fuses, and a second sends an engine's forwards to torch).
REFERENCE_VALUES = 1 << 21


def _reference(params: Sequence[torch.Tensor]) -> dict[int, torch.Tensor] | None:
    """Copies of ``params``' values by id; None for a net too large to copy."""
    if sum(p.numel() for p in params) > REFERENCE_VALUES:
        return None
    return {id(p): p.detach().clone() for p in params}


def _only_read(reference, params, before: tuple | None, now: tuple) -> bool:
    """Whether every parameter whose hand-out generation moved from ``before`` to ``now``
    still holds the values in ``reference``: its hand-outs were reads."""
    if reference is None or before is None or len(before) != len(now):
        return False
    for p, was, is_ in zip(params, before, now):
        if was != is_:
            kept = reference.get(id(p))
            if kept is None or kept.shape != p.shape or not torch.equal(kept, p):
                return False
    return True


__all__ = ["REFERENCE_VALUES", "_reference", "_only_read"]
