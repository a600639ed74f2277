"""PriorBox bit for bit against a one-prior-at-a-time reading of SSD's
``PriorBoxLayer::Forward_cpu`` (weiliu89/caffe branch ``ssd``): its loop order (cell row,
cell column, min_size, then the max_size square, then each aspect ratio), its ``int`` sizes,
its float centres and steps, corners computed in double and stored as float, then clip and
the variances. ``sqrt`` of a float aspect ratio is the float square root, as the real-Caffe
golden ``ssd_priorbox`` shows (a double one differs from it in 22 values)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.engine.layers.ssd import PriorBox
from caffe_compat.proto import caffe_pb2

F32 = np.float32


def ssd_ratios(p) -> list:
    ratios = [F32(1)]
    for given in p.aspect_ratio:
        ar = F32(given)
        if any(abs(F32(ar - seen)) < 1e-6 for seen in ratios):
            continue
        ratios.append(ar)
        if p.flip:
            ratios.append(F32(1.0 / float(ar)))
    return ratios


def pair(p, single: str, h: str, w: str) -> tuple:
    if p.HasField(h) or p.HasField(w):
        return getattr(p, h), getattr(p, w)
    return (getattr(p, single),) * 2 if p.HasField(single) else (0, 0)


def reference(p, layer_hw: tuple, image_hw: tuple) -> np.ndarray:
    img_h, img_w = pair(p, "img_size", "img_h", "img_w")
    if img_h == 0 or img_w == 0:
        img_h, img_w = image_hw
    step_h, step_w = (F32(s) for s in pair(p, "step", "step_h", "step_w"))
    if step_h == 0 or step_w == 0:
        step_h, step_w = F32(F32(img_h) / F32(layer_hw[0])), F32(F32(img_w) / F32(layer_hw[1]))
    out = []
    for h in range(layer_hw[0]):
        for w in range(layer_hw[1]):
            cx, cy = F32(F32(w + F32(p.offset)) * step_w), F32(F32(h + F32(p.offset)) * step_h)
            for s, min_size in enumerate(p.min_size):
                lo = int(min_size)
                sizes = [(F32(lo), F32(lo))]
                if p.max_size:
                    side = F32(math.sqrt(lo * int(p.max_size[s])))
                    sizes.append((side, side))
                for ar in ssd_ratios(p):
                    if abs(float(ar) - 1.0) >= 1e-6:
                        root = F32(math.sqrt(float(ar)))      # sqrtf: the float nearest
                        sizes.append((F32(F32(lo) * root), F32(F32(lo) / root)))
                for bw, bh in sizes:
                    out += [(float(cx) - float(bw) / 2.0) / img_w,
                            (float(cy) - float(bh) / 2.0) / img_h,
                            (float(cx) + float(bw) / 2.0) / img_w,
                            (float(cy) + float(bh) / 2.0) / img_h]
    boxes = np.asarray(out, dtype=F32)
    if p.clip:
        boxes = np.minimum(np.maximum(boxes, F32(0)), F32(1))
    variances = list(p.variance) or [0.1]
    return np.stack([boxes, np.resize(np.asarray(variances, F32), boxes.size)])


CASES = [
    ("min_size: 9 min_size: 30 max_size: 20 max_size: 60 aspect_ratio: 2 aspect_ratio: 3 "
     "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8", (3, 5), (40, 60)),
    ("min_size: 9 aspect_ratio: 3 flip: false clip: true variance: 0.2 img_h: 50 img_w: 70 "
     "step_h: 9.5 step_w: 7.25 offset: 0.25", (4, 2), (32, 32)),
    ("min_size: 21 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 3 aspect_ratio: 1 "
     "clip: true img_size: 100 offset: 0", (5, 5), (77, 91)),
    ("min_size: 5.5 min_size: 9.9 max_size: 12.8 max_size: 14 aspect_ratio: 1.7 "
     "aspect_ratio: 0.3", (7, 3), (45, 19)),
]


@pytest.mark.parametrize("params,layer_hw,image_hw", CASES)
def test_prior_box_equals_ssds_loop_bit_for_bit(params, layer_hw, image_hw):
    param = caffe_pb2.LayerParameter()
    text_format.Parse(f'name: "pb" type: "PriorBox" prior_box_param {{ {params} }}', param)
    feat, image = (1, 2, *layer_hw), (1, 3, *image_hw)
    layer = PriorBox(param, [feat, image], caffe_pb2.TEST)
    got = layer.forward(torch.zeros(feat), torch.zeros(image))
    want = reference(param.prior_box_param, layer_hw, image_hw)
    assert tuple(got.shape) == (1, *want.shape) == tuple(layer.top_shapes([feat, image])[0])
    np.testing.assert_array_equal(got[0].numpy(), want)
