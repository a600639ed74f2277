"""lmb-freiburg/flownet2's ``DataAugmentation`` layer, as its deploy nets use it: no crop, so
no random transform (the fork augments only when cropping), only the data mean.

The fork's forward is GPU-only (``data_augmentation_layer.cu``); this follows its mean path.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.engine.layers.flownet import FLOWNET2


@register
class DataAugmentation(Layer):
    """Subtract a data mean (``augmentation_param``); bottom ``[N, C, H, W]``, top alike.

    Blob 0 counts forwards (the fork's ``num_iter``, saved in its caffemodels). With
    ``recompute_mean`` > 0 blobs 1 ``[1, C, H, W]`` (per-pixel mean) and 2 ``[1, C, 1, 1]``
    (per-channel mean) follow: each forward up to number ``recompute_mean`` folds this
    batch's mean image into a running mean (``m ← (m·(k−1) + Σ_n x_n / N) / k``, blob 2 its
    spatial mean); then ``mean_per_pixel`` (default true) subtracts blob 1, else blob 2.
    Without ``recompute_mean`` three ``mean`` values with ``mean_per_pixel: false`` are
    subtracted per channel; otherwise the top is the bottom. Loading weights follows the
    fork's CustomCopyBlobs: blob 0 always; per channel only blob 2; per pixel blob 1 when its
    size matches, else blob 2 = the stored mean image's spatial mean, spread over blob 1.
    ``crop_width``/``crop_height`` (the fork's random spatial, chromatic and effect
    augmentation) are refused: not implemented. No backward (the fork's is a FATAL).
    """

    type = "DataAugmentation"
    origin = FLOWNET2
    family = "flownet"
    no_grad_bottoms = (0,)
    exports_to_onnx = False
    traceable = False          # counts forwards and may update its mean

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.augmentation_param
        if p.HasField("crop_width") or p.HasField("crop_height"):
            raise self.error("crop_width/crop_height (the fork's random augmentation) are "
                             "not supported; deploy nets set neither")
        if len(bottom_shapes[0]) > 4:
            raise self.error(f"the bottom must have at most 4 axes, got {list(bottom_shapes[0])}")
        _, c, h, w = legacy_shape(tuple(bottom_shapes[0]))
        self.recompute, self.per_pixel = int(p.recompute_mean), p.mean_per_pixel
        self.fixed = None
        if not self.recompute and len(p.mean) == 3 and not self.per_pixel:
            if c != 3:
                raise self.error(f"three mean values need 3 channels, got {c}")
            self.fixed = torch.tensor(list(p.mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.add_blob(torch.zeros(1, 1, 1, 1), learnable=False)
        if self.recompute:
            self.add_blob(torch.zeros(1, c, h, w), learnable=False)
            self.add_blob(torch.zeros(1, c, 1, 1), learnable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(legacy_shape(tuple(x.shape)))
        with torch.no_grad():
            self.blobs[0].add_(1)
            if self.recompute and self.blobs[0].item() <= self.recompute:
                self._fold_mean(x)
        if self.recompute:
            mean = self.blobs[1] if self.per_pixel else self.blobs[2]
            return x - mean.detach().to(x.dtype)
        if self.fixed is not None:
            return x - self.fixed.to(x.device, x.dtype)
        return x.clone()

    def _fold_mean(self, x: torch.Tensor) -> None:
        k = self.blobs[0].item()
        mean = self.blobs[1]
        mean.mul_(k - 1).add_(x.detach().float().mean(dim=0, keepdim=True)).div_(k)
        self.blobs[2].copy_(mean.mean(dim=(2, 3), keepdim=True))

    def copy_stored_blobs(self, path: str, arrays: list[np.ndarray]) -> None:
        """The fork's ``adjust_blobs`` (called instead of the usual shape-checked copy)."""
        if not self.recompute or len(arrays) < 2:
            return                      # the fork copies nothing then
        channels = self.blobs[1].shape[1]
        with torch.no_grad():
            self.blobs[0].copy_(torch.as_tensor(float(arrays[0].reshape(-1)[0])))
            if not self.per_pixel:
                self._copy_channel_mean(path, arrays, channels)
                return
            stored = arrays[1].reshape(-1, *arrays[1].shape[-2:]) if arrays[1].ndim >= 2 \
                else arrays[1].reshape(-1, 1, 1)
            if stored.shape[0] != channels:
                raise self.error(f"{path}: the stored mean image has {stored.shape[0]} "
                                 f"channels, the bottom {channels}")
            means = torch.from_numpy(stored.astype(np.float32)).mean(dim=(1, 2))
            self.blobs[2].copy_(means.view(1, channels, 1, 1))
            if tuple(stored.shape[1:]) == tuple(self.blobs[1].shape[2:]):
                self.blobs[1].copy_(torch.from_numpy(stored.astype(np.float32))[None])
            else:
                self.blobs[1].copy_(self.blobs[2].expand_as(self.blobs[1]))

    def _copy_channel_mean(self, path: str, arrays: list[np.ndarray], channels: int) -> None:
        if len(arrays) < 3 or arrays[2].size != channels:
            raise self.error(f"{path}: DataAugmentation needs a stored per-channel mean of "
                             f"{channels} values (blob 2)")
        self.blobs[2].copy_(torch.from_numpy(arrays[2].astype(np.float32).reshape(1, -1, 1, 1)))
