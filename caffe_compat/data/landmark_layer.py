"""LandmarkHeatmap (project extension): Gaussian target heatmaps from landmark coordinates.

Bottoms: landmarks (N, K, 3) as (x, y, visible) in image pixels — the third top of a Data or
ImageData layer — and optionally the image blob (N, C, H, W), which gives the image size.
Top: (N, K, H', W') maps with a peak of 1 at each visible landmark and all zeros for
invisible ones, for an EuclideanLoss against predicted heatmaps.

``landmark_heatmap_param { height width sigma }``: the map size (default: the image blob's
H×W; without an image bottom both must be set and coordinates are taken as map pixels);
sigma in map pixels, 0 (default) meaning max(H', W')/32. When the map and image sizes
differ, coordinates are scaled between pixel centres (x' = (x + 0.5)·W'/W − 0.5). The
layer is a label transform: it never back-propagates.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caffe_compat.data.landmarks import render_heatmaps
from caffe_compat.engine.layers.base import Layer, Shape, register


@register
class LandmarkHeatmap(Layer):
    type = "LandmarkHeatmap"
    num_bottoms = (1, 2)
    num_tops = (1, 1)
    no_grad_bottoms = (0, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.landmark_heatmap_param
        lm = tuple(bottom_shapes[0])
        if len(lm) != 3 or lm[2] != 3:
            raise self.error(f"bottom 0 must be landmarks (N, K, 3), got {lm}")
        if len(bottom_shapes) > 1:
            image = tuple(bottom_shapes[1])
            if len(image) != 4 or image[0] != lm[0]:
                raise self.error(f"bottom 1 must be the (N, C, H, W) image blob of the same "
                                 f"batch, got {image} for landmarks {lm}")
            self.image_hw = image[2:]
        else:
            self.image_hw = None
        if (p.height > 0) != (p.width > 0):
            raise self.error("landmark_heatmap_param: set both height and width, or neither")
        if p.height > 0:
            self.map_hw = (int(p.height), int(p.width))
        elif self.image_hw is not None:
            self.map_hw = self.image_hw
        else:
            raise self.error("needs landmark_heatmap_param { height width } or the image blob "
                             "as bottom 1")
        if p.sigma < 0:
            raise self.error("landmark_heatmap_param.sigma must be >= 0")
        self.sigma = float(p.sigma)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        n, k, _ = bottom_shapes[0]
        return [(n, k) + tuple(self.map_hw)]

    def forward(self, landmarks: torch.Tensor, image: torch.Tensor | None = None):
        h, w = self.map_hw
        sx = sy = 1.0
        if image is not None:
            sy, sx = h / image.shape[2], w / image.shape[3]
        with torch.no_grad():
            maps = render_heatmaps(landmarks.detach(), h, w, self.sigma, sx, sy)
        return maps.to(dtype=landmarks.dtype if landmarks.is_floating_point() else torch.float32)
