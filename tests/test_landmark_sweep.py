"""experiments/landmark_sweep.py: the variant edits, and the spatial-softmax loss against float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.engine.layers.base import TRAIN
from caffe_compat.engine.net.module import build_net
from caffe_compat.proto import caffe_pb2
from experiments import landmark_sweep as sweep

# a stand-in for the model's loss section: a Data layer (for the batch size), the target
# renderer and the EuclideanLoss that the variants replace or edit
LOSS_NET = """
layer { name: "data" type: "Data" top: "data" data_param { source: "x" batch_size: 2 } }
layer { name: "lm_target" type: "LandmarkHeatmap" bottom: "landmarks" top: "heatmap_target"
        landmark_heatmap_param { height: 8 width: 8 sigma: 1.5 } }
layer { name: "landmark_loss" type: "EuclideanLoss" bottom: "heatmaps"
        bottom: "heatmap_target" top: "landmark_loss" loss_weight: 0.005 }
"""
INPUTS = """
layer { name: "in" type: "Input" top: "heatmaps" top: "landmarks"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 3 dim: 3 } } }
"""


def _edited(edit, value) -> caffe_pb2.NetParameter:
    net = text_format.Parse(LOSS_NET, caffe_pb2.NetParameter())
    edit(net, value)
    del net.layer[0]                                    # the Data layer: feed Inputs instead
    full = text_format.Parse(INPUTS, caffe_pb2.NetParameter())
    full.layer.extend(net.layer)
    return full


def test_variant_names_parse_into_edits():
    edits = sweep.variant_edits("scale10+lw0.02+sigma4")
    assert [(fn.__name__, v) for fn, v in edits] == [
        ("scale_targets", 10.0), ("set_loss_weight", 0.02), ("set_sigma", 4.0)]
    assert sweep.variant_edits("baseline") == []
    with pytest.raises(ValueError, match="unknown variant part 'bogus'"):
        sweep.variant_edits("bogus")


def test_scaled_targets_multiply_the_euclidean_loss_by_the_square():
    rng = np.random.default_rng(0)
    heat = torch.tensor(rng.normal(0, 1, (2, 3, 8, 8)), dtype=torch.float32)
    lm = torch.tensor([[[2, 3, 1], [5, 5, 1], [0, 7, 0]]] * 2, dtype=torch.float32)
    plain = build_net(_edited(sweep.set_loss_weight, 0.005), TRAIN)
    scaled = build_net(_edited(sweep.scale_targets, 10.0), TRAIN)
    _, out = plain.forward_loss(keep_all=True, heatmaps=heat * 10, landmarks=lm)
    _, out10 = scaled.forward_loss(heatmaps=heat * 10, landmarks=lm)
    target = out["heatmap_target"].double()
    expected = ((heat.double() * 10 - 10 * target) ** 2).sum() / 2 / 2
    assert float(out10["landmark_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["landmark_loss"]) != pytest.approx(float(out10["landmark_loss"]))


def test_spatial_softmax_loss_is_the_cross_entropy_with_the_normalised_target():
    rng = np.random.default_rng(1)
    heat = torch.tensor(rng.normal(0, 2, (2, 3, 8, 8)), dtype=torch.float32)
    lm = torch.tensor([[[2, 3, 1], [5, 5, 1], [0, 7, 0]], [[7, 0, 1], [4, 4, 1], [1, 1, 1]]],
                      dtype=torch.float32)
    net = build_net(_edited(sweep.spatial_softmax, 0.1), TRAIN)
    loss, out = net.forward_loss(keep_all=True, heatmaps=heat, landmarks=lm)
    target = out["heatmap_target"].double().reshape(2, 3, -1) / (2 * np.pi * 1.5 ** 2)
    logp = torch.log_softmax(heat.double().reshape(2, 3, -1), dim=2)
    expected = -(target * logp).sum() / 2                   # summed over maps, mean over batch
    assert float(out["landmark_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * float(expected), rel=1e-5)
