"""Shared helpers for layer tests: build one layer from prototxt text, float64 gradient checks."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from google.protobuf import text_format

from caffe_compat.engine.layers import TEST, TRAIN, layer_class
from caffe_compat.proto import caffe_pb2

GOLDENS = Path(__file__).parent / "goldens" / "layers"
FWD = dict(rtol=1e-4, atol=1e-5)     # goldens/README.md tolerances
BWD = dict(rtol=1e-3, atol=1e-5)


def make_layer(text: str, bottom_shapes: Sequence[Sequence[int]], phase: int = TEST):
    """Build the layer described by ``text`` (one LayerParameter body, prototxt syntax)."""
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(param.type)(param, [tuple(s) for s in bottom_shapes], phase)


class Golden:
    """One golden case: its layer params by name, the npz arrays, and the phase."""

    def __init__(self, case: str):
        folder = GOLDENS / case
        net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
        self.layers = {lp.name: lp for lp in net.layer}
        self.data = np.load(folder / "golden.npz")
        self.phase = TRAIN if (folder / "phase.txt").read_text().strip() == "TRAIN" else TEST

    def t(self, key: str) -> torch.Tensor:
        return torch.from_numpy(self.data[key].copy())

    def layer(self, name: str, *bottoms: torch.Tensor, load: bool = True):
        """Build layer ``name`` for these bottoms; ``load`` copies in its golden params."""
        lp = self.layers[name]
        layer = layer_class(lp.type)(lp, [tuple(b.shape) for b in bottoms], self.phase)
        if load:
            for i, blob in enumerate(layer.blobs):
                with torch.no_grad():
                    blob.copy_(self.t(f"param/{name}/{i}"))
        return layer


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def gradcheck_layer(layer, bottoms: Sequence[torch.Tensor], grad_bottoms: Sequence[int] | None = None,
                    eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    """Check the layer's analytic gradients (inputs and learnable blobs) in float64.

    ``grad_bottoms`` lists the bottom indices to check (default: all floating bottoms
    except the layer's ``no_grad_bottoms``).
    """
    layer = layer.double()
    if grad_bottoms is None:
        grad_bottoms = [i for i in range(len(bottoms)) if i not in layer.no_grad_bottoms]
    inputs = [b.detach().double().requires_grad_(i in grad_bottoms) for i, b in enumerate(bottoms)]
    params = [p for p in layer.blobs if p.requires_grad]

    _gradcheck_with_params(layer, inputs, params, eps, atol, rtol)


def _gradcheck_with_params(layer, inputs, params, eps, atol, rtol):
    """Finite differences on every checked input and param element vs autograd."""
    targets = [t for t in inputs if t.requires_grad] + params
    outs = as_tuple(layer(*inputs))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]

    def objective():
        with torch.no_grad():
            return sum((o.double() * w).sum() for o, w in zip(as_tuple(layer(*inputs)), weights)
                       if o.is_floating_point())

    for t in targets:
        t.grad = None
    obj = sum((o * w).sum() for o, w in zip(outs, weights) if o.is_floating_point() and o.requires_grad)
    if torch.is_tensor(obj):
        obj.backward()
    for t in targets:
        analytic = t.grad if t.grad is not None else torch.zeros_like(t)
        numeric = torch.zeros_like(t)
        flat = t.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            plus = objective()
            flat[i] = old - eps
            minus = objective()
            flat[i] = old
            numeric.view(-1)[i] = (plus - minus) / (2 * eps)
        torch.testing.assert_close(analytic, numeric, atol=atol, rtol=rtol)


def zero_fillers(mp: "pytest.MonkeyPatch") -> None:
    """Make the weight fillers return zeros under ``mp`` (building a 224 net holds 10^8
    weights; tests of shapes and counts need no values). The layer modules are imported
    first: one imported under the patch (``from fillers import fill``) would keep the zeros
    for the rest of the session, and every net built after it (a Scale's gamma 0) trains
    nothing."""
    from caffe_compat.engine import fillers
    from caffe_compat.engine.layers import conv, inner_product
    from caffe_compat.engine.layers.base import layer_types

    def zeros(filler, shape):
        return torch.zeros(tuple(shape))
    layer_types()
    for module in (fillers, conv, inner_product):
        mp.setattr(module, "fill", zeros)


def sgd_solver(tmp_path: Path, mp: "pytest.MonkeyPatch", net: str, **inputs: np.ndarray):
    """A plain SGD solver (base_lr 0.1, fixed) for the net text, run in ``tmp_path``, with
    the named input blobs filled; for one-step checks by hand."""
    import caffe_compat as caffe
    mp.chdir(tmp_path)
    mp.setenv("GLOG_minloglevel", "1")
    Path("net.prototxt").write_text(net)
    Path("solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                                       'max_iter: 10\ndisplay: 0\n')
    solver = caffe.get_solver("solver.prototxt")
    for name, value in inputs.items():
        solver.net.blobs[name].data[...] = value
    return solver
