"""Winograd F(4x4, 3x3) for the fused inference net's 3x3 convolutions.

A stride-1 3x3 convolution computes each 4x4 output tile from a 6x6 input tile with 36
multiplications per channel pair instead of 144: ``Y = A^T [ (G g G^T) . (B^T d B) ] A``.
On the CPUs measured (benchmarks/NOTES.md) that is 1.2-2x faster than oneDNN's direct
convolution for the mid-sized layers of VGG-style nets, and slower for thin or tiny ones,
so ``eligible`` only takes the shapes where it won.

Accuracy: the transform matrices come from interpolation points. The classic
(0, 1, -1, 2, -2) loses about 3x the accuracy of a direct fp32 convolution; the points
(0, 1, -1, 1/2, -2) (Barabasz et al., "Error analysis and improving the accuracy of
Winograd convolution for deep neural networks", 2018) match it: max relative error
2-3e-6 per layer, like the direct path's. B^T then holds only multiples of 1/2, so the
input transform is exact up to one rounding per sum; G is applied to the weights once, in
float64.

``$CAFFE_COMPAT_WINOGRAD``: ``off`` disables it (bit-for-bit the direct convolution),
``on`` uses it on every 3x3 stride-1 convolution it can compute (tests), default ``auto``.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

POINTS = (0.0, 1.0, -1.0, 0.5, -2.0)
TILE = 4                        # output tile side
SPAN = TILE + 2                 # input tile side for a 3x3 kernel


@lru_cache(maxsize=1)
def transforms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T 4x6, G 6x3, B^T 6x6) of F(4, 3) for ``POINTS`` (plus the point at infinity).

    A^T and G are the Toom-Cook evaluation/interpolation matrices; B^T is solved from the
    identity ``sum_j A^T[i,j] G[j,k] B^T[j,l] = [l == i + k]`` (a 1-D correlation)."""
    m, r, n = TILE, 3, SPAN
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for j, p in enumerate(POINTS):
        at[:, j] = [p ** i for i in range(m)]
        g[j] = [p ** k / np.prod([p - q for q in POINTS if q != p]) for k in range(r)]
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    rows, rhs = [], []
    for i in range(m):
        for k in range(r):
            for col in range(n):
                row = np.zeros((n, n))
                row[:, col] = at[i] * g[:, k]
                rows.append(row.ravel())
                rhs.append(float(col == i + k))
    bt = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(n, n)
    return at, g, np.round(bt * 2) / 2          # B^T's entries are halves; drop the lstsq dust


_MODES = {"auto": "auto", "": "auto", "off": "off", "0": "off", "false": "off",
          "on": "on", "1": "on", "true": "on"}


def mode() -> str:
    """``auto``, ``off`` or ``on``, from $CAFFE_COMPAT_WINOGRAD."""
    value = os.environ.get("CAFFE_COMPAT_WINOGRAD", "auto")
    try:
        return _MODES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"CAFFE_COMPAT_WINOGRAD={value!r}: expected auto, on or off") from None


def eligible(weight: torch.Tensor, stride, dilation, groups: int, x: torch.Tensor) -> bool:
    """Whether this convolution of ``x`` runs as Winograd (see the module docstring)."""
    setting = mode()
    if setting == "off" or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if tuple(weight.shape[2:]) != (3, 3) or groups != 1 or tuple(stride) != (1, 1) \
            or tuple(dilation) != (1, 1):
        return False
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False        # no gradient through the transformed weights; exports keep Conv
    if setting == "on":
        return True
    # Measured on Zen 3 (AVX2), 1 thread (benchmarks/NOTES.md): 1.3-1.9x the direct kernel
    # from 128 output channels and 64 input channels on maps of 28 and more; thinner layers
    # (ResNet's 64 -> 64 at 56: 0.8x) and maps under 16 (the 4x larger transformed weights
    # dominate) are no faster.
    c_in, c_out = weight.shape[1], weight.shape[0]
    return c_in >= 64 and c_out >= 128 and min(x.shape[2], x.shape[3]) >= 16


def weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) weights as the 36 (C_in, C_out) matrices ``G g G^T``."""
    g = torch.from_numpy(transforms()[1])
    u = g @ weight.detach().double() @ g.t()                         # (C_out, C_in, 6, 6)
    c_out, c_in = weight.shape[:2]
    return u.permute(2, 3, 1, 0).reshape(SPAN * SPAN, c_in, c_out).to(weight.dtype).contiguous()


@lru_cache(maxsize=4)
def _tile_maps(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both 2-D transforms as single matrices on flattened tiles: kron(B^T, B^T) (36x36)
    and kron(A^T, A^T) (16x36). One GEMM each costs far less than dozens of small ops."""
    at, _, bt = transforms()
    return (torch.tensor(np.kron(bt, bt), dtype=dtype), torch.tensor(np.kron(at, at), dtype=dtype))


# Tile rows are transformed in bands, so that the transformed tiles (2.25x the input) stay in
# cache: a whole 112x112 map's would not (on the 2-core Zen 3 box a DRAM-bound pass runs at
# 8 GB/s, a cached one at ~30). Every band re-reads the transformed weights, so a band is
# never smaller than they are: 512-channel layers run as one band.
MIN_BAND_BYTES = 1 << 20


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
            padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=padding)`` for a 3x3 stride-1 ``w`` with
    ``u = weight_transform(w)``. Returns an NHWC-strided (channels_last) NCHW tensor."""
    n, c, h, w = x.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // TILE), -(-wo // TILE)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw + TILE * tw - wo, ph, ph + TILE * th - ho))
    c_out = u.shape[2]
    y = torch.empty(n, th, TILE, tw, TILE, c_out, dtype=x.dtype)
    row_bytes = SPAN * SPAN * n * tw * max(c, c_out) * x.element_size()
    band_bytes = max(MIN_BAND_BYTES, u.numel() * u.element_size())
    band = max(1, min(th, band_bytes // row_bytes))
    for r0 in range(0, th, band):
        r1 = min(th, r0 + band)
        _band(padded[:, TILE * r0:TILE * r1 + 2], u, bias, y[:, r0:r1])
    return y.view(n, th * TILE, tw * TILE, c_out)[:, :ho, :wo].permute(0, 3, 1, 2)


def _band(padded: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
          out: torch.Tensor) -> None:
    """One band of tile rows: NHWC input rows -> ``out`` (n, rows, 4, tw, 4, C_out)."""
    n, rows, _, tw, _, c_out = out.shape
    c = padded.shape[3]
    tiles = padded.unfold(1, SPAN, TILE).unfold(2, SPAN, TILE)      # n, rows, tw, c, 6, 6
    count = n * rows * tw
    gathered = tiles.permute(4, 5, 0, 1, 2, 3).reshape(SPAN * SPAN, count * c)
    to_tiles, from_tiles = _tile_maps(padded.dtype)
    v = torch.mm(to_tiles, gathered).view(SPAN * SPAN, count, c)
    m = torch.bmm(v, u).view(SPAN * SPAN, count * c_out)
    y_tiles = torch.mm(from_tiles, m).view(TILE, TILE, n, rows, tw, c_out)
    source = y_tiles.permute(2, 3, 0, 4, 1, 5)
    if bias is None:
        out.copy_(source)
    else:
        torch.add(source, bias, out=out)
