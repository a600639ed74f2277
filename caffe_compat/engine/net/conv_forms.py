"""Convolution forms for a fused inference plan, chosen by timing them on the net's own shapes.

On a batch-1 forward of a small net no one kernel wins every convolution (benchmarks/NOTES.md,
measured alternating on the 2-core AMX Xeon): LeNet's 1-channel conv1 takes 55 us through
``F.conv2d`` and 15 us as an im2col view + one ``addmm``; MTCNN O-Net's 3-channel conv1 takes
50 us on NCHW memory and 112 us on NHWC, while its conv3/conv4 are 25-40% faster on NHWC;
oneDNN's primitive with pre-packed weights beats both on some layers and costs ~25 us of
fixed overhead on others. So a FoldedLinear 2-D convolution with little work
(``MEASURE_MACS``) times the forms below on the tensor it is given, once, and keeps the
fastest whose output equals its own direct path's (``TOLERANCE``); the choice is cached per
geometry and input layout for the process, so a re-fusion (changed weights) times nothing
and checks only the chosen form against the direct path.

Forms (each returns the convolution with bias; the caller applies a fused rectifier unless
the form did): ``direct`` the FoldedLinear's own path (Winograd where it applies, else the
layer's ``F.conv2d``) on the tensor as it comes; ``nchw`` / ``nhwc`` the same convolution on
NCHW / NHWC copies of input and weights; ``im2col`` (groups 1, batch 1) the input's patches
as a strided view and one ``addmm``; ``packed`` oneDNN's convolution with weights reordered
once (``torch.ops.mkldnn``, where this torch has it; its ReLU fused). Every output is put in
the plan's layout (NHWC in a channels-last plan, else the direct path's): the layers after a
convolution were planned for it.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

MEASURE_MACS = 30e6          # above this a kernel's fixed costs no longer decide
TOLERANCE = 1e-4             # relative to the largest |output|: fp32 summation-order noise
_CHOICES: dict[tuple, str] = {}


def worth_measuring(weight_shape, in_shape, args: dict) -> bool:
    """A 2-D convolution of these shapes has little enough work (``MEASURE_MACS``) for a
    kernel's fixed costs to decide which form is fastest."""
    if len(in_shape) != 4 or len(weight_shape) != 4:
        return False
    out = [(in_shape[2 + i] + 2 * args["padding"][i] - args["dilation"][i]
            * (weight_shape[2 + i] - 1) - 1) // args["stride"][i] + 1 for i in range(2)]
    return 0 < math.prod(weight_shape) * in_shape[0] * out[0] * out[1] <= MEASURE_MACS


def _geometry(args: dict) -> tuple:
    return tuple(tuple(args[k]) if isinstance(args[k], (tuple, list)) else args[k]
                 for k in ("stride", "padding", "dilation", "groups"))


def _nchw(weight, bias, args) -> Callable:
    w = weight.contiguous()
    return lambda x: F.conv2d(x.contiguous(), w, bias, args["stride"], args["padding"],
                              args["dilation"], args["groups"])


def _nhwc(weight, bias, args) -> Callable:
    w, cl = weight.contiguous(memory_format=torch.channels_last), torch.channels_last
    return lambda x: F.conv2d(x.contiguous(memory_format=cl), w, bias, args["stride"],
                              args["padding"], args["dilation"], args["groups"])


def _im2col(weight, bias, args, in_shape, out_shape) -> Callable | None:
    """Patches of a batch-1 input as an (C*kh*kw, OH*OW) strided view, times the weights."""
    if args["groups"] != 1 or tuple(args["dilation"]) != (1, 1) or in_shape[0] != 1:
        return None
    cout, c, kh, kw = weight.shape
    oh, ow = out_shape[2], out_shape[3]
    (sh, sw), (ph, pw) = args["stride"], args["padding"]
    matrix = weight.reshape(cout, -1).contiguous()
    column = (torch.zeros(cout, 1) if bias is None else bias.reshape(cout, 1)).to(weight)

    def im2col(x: torch.Tensor) -> torch.Tensor:
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        _, s_c, s_h, s_w = x.stride()
        patches = x.as_strided((c, kh, kw, oh, ow), (s_c, s_h, s_w, s_h * sh, s_w * sw),
                               x.storage_offset())
        return torch.addmm(column, matrix, patches.reshape(c * kh * kw, oh * ow)).view(
            1, cout, oh, ow)
    return im2col


def _packed(weight, bias, args, in_shape, slope) -> Callable | None:
    """oneDNN's convolution on weights reordered once for this input shape; ReLU fused."""
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not hasattr(ops, "_convolution_pointwise") or \
            not torch.backends.mkldnn.is_available() or slope not in (None, 0.0):
        return None
    geo = [list(args[k]) for k in ("padding", "stride", "dilation")]
    try:
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.contiguous().to_mkldnn(), *geo, args["groups"], list(in_shape))
    except (RuntimeError, NotImplementedError):
        return None
    attr = "none" if slope is None else "relu"
    conv = ops._convolution_pointwise
    return lambda x: conv(x, packed, bias, *geo, args["groups"], attr, [], "")


def _laid_out(form: Callable, layout: torch.memory_format) -> Callable:
    """``form`` with its output in ``layout``: the layers after a convolution get the layout
    they were planned for (max pooling on NCHW memory took 5x its NHWC time on R-Net)."""
    return lambda x: form(x).contiguous(memory_format=layout)


def candidates(direct: Callable, weight: torch.Tensor, bias: torch.Tensor | None, args: dict,
               x: torch.Tensor, want: torch.Tensor, slope,
               layout: torch.memory_format | None = None) -> dict[str, tuple]:
    """name -> (form, applies the rectifier itself); every form's output is laid out in
    ``layout`` (default: as ``want``, the direct path's output, is)."""
    if layout is None:
        layout = torch.channels_last if (want.is_contiguous(memory_format=torch.channels_last)
                                         and not want.is_contiguous()) \
            else torch.contiguous_format
    forms = {"direct": direct, "nchw": _nchw(weight, bias, args), "nhwc": _nhwc(weight, bias, args),
             "im2col": _im2col(weight, bias, args, x.shape, want.shape),
             "packed": _packed(weight, bias, args, x.shape, slope)}
    found = {}
    for name, form in forms.items():
        if form is not None:
            keep = name == "direct" and want.is_contiguous(memory_format=layout)
            found[name] = (form if keep else _laid_out(form, layout),
                           name == "packed" and slope is not None)
    return found


def fastest(forms: dict[str, Callable], x: torch.Tensor, rounds: int = 5,
            budget_s: float = 3e-4, margin: float = 0.9) -> str:
    """The form with the least time per call (best of ``rounds``, alternating; each round
    about ``budget_s`` of calls per form, at least one), if it takes under ``margin`` of the
    direct path's time: a choice made in a noisy second must not cost more than it wins."""
    start = time.perf_counter()
    forms["direct"](x)
    calls = max(1, min(5, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    best = {name: math.inf for name in forms}
    for _ in range(rounds):
        for name, form in forms.items():
            start = time.perf_counter()
            for _ in range(calls):
                form(x)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    winner = min(best, key=best.get)
    return winner if best[winner] < margin * best["direct"] else "direct"


def choose(direct: Callable, weight: torch.Tensor, bias: torch.Tensor | None, args: dict,
           slope, x: torch.Tensor, layout: torch.memory_format | None = None
           ) -> tuple[Callable, bool, str] | None:
    """(the fastest form for tensors shaped and laid out as ``x``, whether it applies
    ``slope``, its name), or None where the direct path is kept as it is. Timed and checked
    on random values of that layout; outputs in ``layout`` (see ``candidates``)."""
    if not worth_measuring(weight.shape, x.shape, args) or x.dtype != torch.float32:
        return None
    with torch.no_grad():
        x = torch.randn_like(x)
        want = direct(x)
        forms = candidates(direct, weight, bias, args, x, want, slope, layout)
        key = (tuple(weight.shape), _geometry(args), tuple(x.shape), x.stride(),
               slope is None, tuple(forms), layout)
        scale = max(1.0, float(want.abs().max()))
        if slope is not None:
            want = F.leaky_relu(want, slope)
        agree = {"direct": forms["direct"][0]}     # the reference, even if a conversion
        known = _CHOICES.get(key)
        # a re-fusion (changed weights) checks only the form already chosen for this key
        checked = forms if known is None else {k: v for k, v in forms.items() if k == known}
        for name, (form, rectifies) in checked.items():
            got = form(x)
            if not rectifies and slope is not None:
                got = F.leaky_relu(got, slope)
            if got.shape == want.shape and float((got - want).abs().max()) <= TOLERANCE * scale:
                agree[name] = form
        if key not in _CHOICES:
            _CHOICES[key] = fastest(agree, x) if len(agree) > 1 else "direct"
        name = _CHOICES[key] if _CHOICES[key] in agree else "direct"
        if agree.get(name, direct) is direct:
            return None                       # the direct path, already in the layout
        return agree[name], forms[name][1], name


__all__ = ["choose", "candidates", "fastest", "worth_measuring", "MEASURE_MACS", "TOLERANCE"]
