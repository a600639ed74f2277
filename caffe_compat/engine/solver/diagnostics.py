"""What the solver reports when the training loss stops being a finite number."""
from __future__ import annotations

from typing import Mapping

import torch

from caffe_compat.formats import glog
from caffe_compat.formats.glog import num


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the iteration and layer."""


def fail_non_finite(solver, loss: float, feed: Mapping[str, torch.Tensor]) -> None:
    """Snapshot the state before this update, find the first non-finite layer, raise."""
    msg = f"Iteration {solver.iter}: the training loss is {num(loss)}"
    bad = [lp.name for lp in solver.train_module.learnable_params
           if not bool(torch.isfinite(lp.tensor).all())]
    model, state = solver.snapshot()
    where = first_non_finite_output(solver.train_module, feed)
    msg += f"; {where}. Wrote a snapshot of the last state before this update: {model}, {state}"
    if bad:
        msg += f" (already non-finite in it: {', '.join(bad)})"
    msg += ". Lower base_lr, set clip_gradients, or check the input data."
    glog.error(msg, "solver.cpp:230")
    raise NonFiniteLossError(msg)


def first_non_finite_output(module, feed: Mapping[str, torch.Tensor]) -> str:
    """Re-run the forward pass layer by layer and name the first non-finite top."""
    blobs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, name in enumerate(module.layer_names):
            try:
                module.run(feed, i, i, blobs=blobs)
            except Exception as exc:   # diagnostics must not hide the real error
                return f"re-running the forward pass failed at layer '{name}': {exc}"
            for top in module.layer_tops(i):
                t = blobs.get(top)
                if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return (f"the first non-finite output is top '{top}' of layer '{name}' "
                            f"({module.layers[i].type})")
    return ("a diagnostic forward pass found every layer output finite (the value "
            "depends on the batch, or arose in the backward pass)")
