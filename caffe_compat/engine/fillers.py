"""Caffe's weight fillers (``include/caffe/filler.hpp``) on torch's global RNG.

``fill(filler_param, shape)`` returns a float32 tensor drawn the way Caffe's filler of that
type draws it: the same distribution, fan sizes and parameter checks. The random stream is
torch's (``torch.manual_seed`` makes it reproducible), not Caffe's mt19937, so values are
statistically, not bit-for-bit, equal to Caffe's.

Fan sizes follow Caffe, from the stored blob shape (no swap for Deconvolution):
``fan_in = count // shape[0]``, ``fan_out = count // shape[1]`` (``count`` for 1-D blobs).
"""
from __future__ import annotations

from caffe_compat.formats.budget import check_shape
from caffe_compat.formats.errors import CaffeCompatError

import math
from typing import Callable, Sequence

import torch

__all__ = ["FillerError", "fill", "filler_types"]

# FillerParameter.VarianceNorm enum values (caffe.proto).
FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2


class FillerError(CaffeCompatError):
    """A FillerParameter that Caffe would reject; the message says what to change."""


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _check_no_sparse(p, kind: str) -> None:
    # Caffe CHECKs sparse == -1 in every filler but gaussian.
    if p.sparse != -1:
        raise FillerError(f"filler '{kind}' does not support sparse (got sparse: {p.sparse}); "
                          "sparse is only allowed with type 'gaussian'")


def _fan_n(p, shape: tuple[int, ...], kind: str) -> float:
    """The n of xavier/msra: fan_in, fan_out or their mean, by variance_norm."""
    if len(shape) < 1 or shape[0] == 0:
        raise FillerError(f"filler '{kind}' needs a blob with at least one axis and shape[0] > 0, "
                          f"got shape {list(shape)}")
    count = _count(shape)
    fan_in = count // shape[0]
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] > 0 else count
    norm = p.variance_norm
    if norm == FAN_IN:
        n = float(fan_in)
    elif norm == FAN_OUT:
        n = float(fan_out)
    elif norm == AVERAGE:
        n = (fan_in + fan_out) / 2.0
    else:
        raise FillerError(f"unknown variance_norm {norm} (known: FAN_IN, FAN_OUT, AVERAGE)")
    if n <= 0:
        raise FillerError(f"filler '{kind}': fan size is 0 for shape {list(shape)}")
    return n


def _uniform(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    # U[lo, hi), like boost::uniform_real; computed in float32 like Caffe.
    if lo > hi:
        raise FillerError(f"uniform filler needs min <= max (got min {lo}, max {hi})")
    return torch.rand(shape, dtype=torch.float32) * (hi - lo) + lo


def _gaussian(shape: tuple[int, ...], mean: float, std: float, kind: str) -> torch.Tensor:
    if not std > 0:
        raise FillerError(f"filler '{kind}' needs std > 0 (got {std})")
    return torch.randn(shape, dtype=torch.float32) * std + mean


def _constant(p, shape):
    _check_no_sparse(p, "constant")
    return torch.full(shape, p.value, dtype=torch.float32)


def _uniform_filler(p, shape):
    _check_no_sparse(p, "uniform")
    return _uniform(shape, p.min, p.max)


def _gaussian_filler(p, shape):
    out = _gaussian(shape, p.mean, p.std, "gaussian")
    if p.sparse >= 0:
        # Keep each weight with probability sparse / num_outputs (shape[0]), so on average
        # `sparse` non-zero inputs feed each output.
        if len(shape) < 1 or shape[0] == 0:
            raise FillerError(f"sparse gaussian filler needs shape[0] > 0, got shape {list(shape)}")
        prob = p.sparse / shape[0]
        if prob > 1:
            raise FillerError(f"sparse ({p.sparse}) must not exceed shape[0] ({shape[0]}): "
                              "it is the expected number of non-zeros per output")
        out = out * torch.bernoulli(torch.full(shape, prob, dtype=torch.float32))
    return out


def _positive_unitball(p, shape):
    _check_no_sparse(p, "positive_unitball")
    out = torch.rand(shape, dtype=torch.float32)
    if len(shape) < 1 or shape[0] == 0:
        return out
    # Each shape[0]-slice (the weights into one output) sums to 1.
    rows = out.reshape(shape[0], -1)
    return (rows / rows.sum(dim=1, keepdim=True)).reshape(shape)


def _xavier(p, shape):
    _check_no_sparse(p, "xavier")
    a = math.sqrt(3.0 / _fan_n(p, shape, "xavier"))
    return _uniform(shape, -a, a)


def _msra(p, shape):
    _check_no_sparse(p, "msra")
    return _gaussian(shape, 0.0, math.sqrt(2.0 / _fan_n(p, shape, "msra")), "msra")


def _bilinear(p, shape):
    _check_no_sparse(p, "bilinear")
    if len(shape) != 4 or shape[2] != shape[3]:
        raise FillerError(f"bilinear filler needs a 4-D blob with a square kernel, got shape "
                          f"{list(shape)}")
    k = shape[3]
    f = math.ceil(k / 2.0)
    c = (k - 1) / (2.0 * f)
    t = torch.arange(k, dtype=torch.float64)
    w1 = 1.0 - (t / f - c).abs()                    # (K,) profile along one axis
    kernel = (w1[:, None] * w1[None, :]).float()    # (K, K): row y, column x
    return kernel.expand(shape).contiguous()


_FILLERS: dict[str, Callable] = {
    "constant": _constant,
    "gaussian": _gaussian_filler,
    "positive_unitball": _positive_unitball,
    "uniform": _uniform_filler,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}


def filler_types() -> list[str]:
    """Every filler type string Caffe knows, sorted."""
    return sorted(_FILLERS)


def fill(filler_param, shape: Sequence[int]) -> torch.Tensor:
    """Draw a float32 tensor of ``shape`` as Caffe's filler ``filler_param`` would.

    Args:
        filler_param: a ``caffe_pb2.FillerParameter`` (None means Caffe's default,
            constant 0).
        shape: the blob shape.

    Raises:
        FillerError: unknown type, or parameters Caffe's filler CHECKs against.
        ResourceError: a negative dim, or a blob larger than the memory budget.
    """
    shape = check_shape(shape, "parameter blob")   # against the memory budget, before allocating
    if filler_param is None:
        return torch.zeros(shape, dtype=torch.float32)
    try:
        make = _FILLERS[filler_param.type]
    except KeyError:
        raise FillerError(f"Unknown filler type: {filler_param.type} "
                          f"(known types: {', '.join(filler_types())})") from None
    return make(filler_param, shape)
