"""Winograd F(4x4, 3x3) and F(2x2, 3x3) for the fused inference net's 3x3 convolutions.

A stride-1 3x3 convolution computes each 4x4 output tile from a 6x6 input tile with 36
multiplications per channel pair instead of 144: ``Y = A^T [ (G g G^T) . (B^T d B) ] A``
(F(2x2): 2x2 tiles from 4x4, 16 instead of 36). On the CPU measured (benchmarks/NOTES.md)
that is 1.25-1.9x faster than oneDNN's direct convolution for the mid-sized layers of
VGG-style nets, and slower for thin or tiny ones, so ``tile_for`` only takes the shapes where
it won.

Accuracy: the transform matrices come from interpolation points. The classic
(0, 1, -1, 2, -2) loses about 3x the accuracy of a direct fp32 convolution; the points
(0, 1, -1, 1/2, -2) (Barabasz et al., "Error analysis and improving the accuracy of
Winograd convolution for deep neural networks", 2018) match it: max relative error
2-3e-6 per layer, like the direct path's. B^T then holds only multiples of 1/2, so the
input transform is exact up to one rounding per sum; G is applied to the weights once, at
fusion. F(2x2)'s points (0, 1, -1) are more accurate still (4e-7).

``$CAFFE_COMPAT_WINOGRAD``: ``off`` disables it (bit-for-bit the direct convolution),
``on`` uses it on every 3x3 stride-1 convolution it can compute (tests), default ``auto``.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

# Interpolation points (plus infinity) per output tile side: F(4x4, 3x3) for large maps,
# F(2x2, 3x3) (2.25x fewer multiplications, 16/9 the weight bytes) for 14x14-ish ones.
POINTS = {4: (0.0, 1.0, -1.0, 0.5, -2.0), 2: (0.0, 1.0, -1.0)}


@lru_cache(maxsize=2)
def transforms(tile: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T, G, B^T) of F(tile, 3) for ``POINTS[tile]`` (plus the point at infinity):
    tile x (tile + 2), (tile + 2) x 3 and (tile + 2) x (tile + 2).

    A^T and G are the Toom-Cook evaluation/interpolation matrices; B^T is solved from the
    identity ``sum_j A^T[i,j] G[j,k] B^T[j,l] = [l == i + k]`` (a 1-D correlation)."""
    points = POINTS[tile]
    m, r, n = tile, 3, tile + 2
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for j, p in enumerate(points):
        at[:, j] = [p ** i for i in range(m)]
        g[j] = [p ** k / np.prod([p - q for q in points if q != p]) for k in range(r)]
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


def tile_for(weight: torch.Tensor, stride, dilation, groups: int, x: torch.Tensor) -> int:
    """The output tile side (4 or 2) this convolution of ``x`` runs with, 0 for the direct
    kernel (see the module docstring)."""
    setting = mode()
    if setting == "off" or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        return 0
    if tuple(weight.shape[2:]) != (3, 3) or groups != 1 or tuple(stride) != (1, 1) \
            or tuple(dilation) != (1, 1):
        return 0
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return 0            # no gradient through the transformed weights; exports keep Conv
    c_in, c_out = weight.shape[1], weight.shape[0]
    h, w = x.shape[2], x.shape[3]
    if setting == "on":
        return 4 if min(h, w) >= 16 else 2
    # Measured on Zen 3 (AVX2), 1 thread (benchmarks/NOTES.md). F(4x4): 1.25-1.9x the direct
    # kernel from 64 input and 96 output channels on maps of 28 and more, 1.1x for 64 -> 64
    # on maps of 112 and 224; ResNet's 64 -> 64 at 56 is slower (0.8-0.95x). On 14x14 maps
    # F(4x4) breaks even (its 4x larger transformed weights dominate) and F(2x2) gives
    # 1.15-1.25x from 128 input channels; 7x7 maps lose with both (0.4-0.9x).
    if c_in >= 64 and c_out >= 64 and min(h, w) >= 16 and (c_out >= 96 or h * w >= 96 * 96):
        return 4
    if c_in >= 128 and c_out >= 128 and min(h, w) >= 12:
        return 2
    return 0


def weight_transform(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """(C_out, C_in, 3, 3) weights as the (tile + 2)^2 (C_in, C_out) matrices ``G g G^T``."""
    g = transforms(tile)[1]
    c_out, c_in = weight.shape[:2]
    # u[a, b] = sum_kl G[a, k] G[b, l] w[k, l]: one GEMM with kron(G, G) over all channel
    # pairs, taken (c_in, c_out)-major so the result needs no transpose. A broadcast
    # ``g @ w @ g.T`` in float64 took 0.5 s for one 512x512 layer (a million 6x3 products);
    # this takes ~50 ms, and rounds 9-term sums once more than float64 would (~1e-7).
    pairs = weight.detach().permute(1, 0, 2, 3).reshape(c_in * c_out, 9)
    kron = torch.from_numpy(np.kron(g, g)).to(weight.dtype)
    return torch.mm(kron, pairs.t()).view(-1, c_in, c_out)               # (span^2, c_in, c_out)


@lru_cache(maxsize=8)
def _matrices(tile: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T and B^T as tensors (one GEMM per tile axis beats dozens of small ops)."""
    at, _, bt = transforms(tile)
    return torch.tensor(at, dtype=dtype), torch.tensor(bt, dtype=dtype)


# Tile rows are transformed in bands, so that the transformed tiles (2.25x the input) stay in
# cache: a whole 112x112 map's would not (on the 2-core Zen 3 box a DRAM-bound pass runs at
# 8 GB/s, a cached one at ~30). Every band re-reads the transformed weights, so a band is
# never smaller than they are: 512-channel layers run as one band.
MIN_BAND_BYTES = 1 << 20


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
            padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=padding)`` for a 3x3 stride-1 ``w`` with
    ``u = weight_transform(w, tile)``, the tile side read from ``u``'s (tile + 2)^2 matrices.
    Returns an NHWC-strided (channels_last) NCHW tensor."""
    tile = {36: 4, 16: 2}[u.shape[0]]
    n, c, h, w = x.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // tile), -(-wo // tile)
    padded = _padded_nhwc(x, ph, pw, tile * th + 2, tile * tw + 2)
    c_out = u.shape[2]
    y = torch.empty(n, th, tile, tw, tile, c_out, dtype=x.dtype)
    row_bytes = u.shape[0] * n * tw * max(c, c_out) * x.element_size()
    band_bytes = max(MIN_BAND_BYTES, u.numel() * u.element_size())
    band = max(1, min(th, band_bytes // row_bytes))
    for r0 in range(0, th, band):
        r1 = min(th, r0 + band)
        _band(padded[:, tile * r0:tile * r1 + 2], u, bias, y[:, r0:r1])
    return y.view(n, th * tile, tw * tile, c_out)[:, :ho, :wo].permute(0, 3, 1, 2)


def _padded_nhwc(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``x`` as an NHWC (n, height, width, c) tensor with zeros around it; only the border is
    zero-filled (F.pad would write the whole tensor twice: a DRAM pass on large maps)."""
    n, c, h, w = x.shape
    out = x.new_empty(n, height, width, c)
    out[:, :top].zero_()
    out[:, top + h:].zero_()
    out[:, top:top + h, :left].zero_()
    out[:, top:top + h, left + w:].zero_()
    out[:, top:top + h, left:left + w].copy_(x.permute(0, 2, 3, 1))
    return out


def _band(padded: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
          out: torch.Tensor) -> None:
    """One band of tile rows: NHWC input rows -> ``out`` (n, rows, tile, tw, tile, C_out)."""
    n, rows, tile, tw, _, c_out = out.shape
    span, c = tile + 2, padded.shape[3]
    tiles = padded.unfold(1, span, tile).unfold(2, span, tile)   # n, rows, tw, c, span, span
    count = n * rows * tw
    gathered = tiles.permute(4, 5, 0, 1, 2, 3).reshape(span, span * count * c)
    at, bt = _matrices(tile, padded.dtype)
    # B^T d B as two GEMMs: rows (B^T on the first tile axis), then columns (B^T broadcast
    # over the row index); for F(4x4) 6x less arithmetic than one kron(B^T, B^T) GEMM.
    v = torch.matmul(bt, torch.mm(bt, gathered).view(span, span, count * c))
    m = torch.bmm(v.view(span * span, count, c), u).view(span, span * count * c_out)
    y_tiles = torch.matmul(at, torch.mm(at, m).view(tile, span, count * c_out))
    y_tiles = y_tiles.view(tile, tile, n, rows, tw, c_out)
    source = y_tiles.permute(2, 3, 0, 4, 1, 5)
    if bias is None:
        out.copy_(source)
    else:
        torch.add(source, bias, out=out)
