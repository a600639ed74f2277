"""models/vgg16_landmark_32_bn is what tools/make_bn_model.py writes and normalises as it says."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.fspath(ROOT / "tools"))
import make_bn_model as gen  # noqa: E402


def test_folder_is_the_generators_output():
    src, dst = ROOT / "models" / gen.SOURCE, ROOT / "models" / gen.TARGET
    for name, deploy in (("train_val.prototxt", False), ("deploy.prototxt", True)):
        expected = gen.bn_net((src / name).read_text(encoding="utf-8"), deploy)
        assert (dst / name).read_text(encoding="utf-8") == expected, name
    assert (dst / "solver_full.prototxt").read_text(encoding="utf-8") == gen.SOLVER


def _layers(name: str) -> list:
    path = ROOT / "models" / gen.TARGET / name
    return list(read_text_proto(path, caffe_pb2.NetParameter).layer)


def test_every_trunk_convolution_and_only_those_is_normalised_in_place():
    for net in ("train_val.prototxt", "deploy.prototxt"):
        layers = _layers(net)
        convs = [i for i, lp in enumerate(layers) if lp.type == "Convolution"]
        trunk = [i for i in convs if gen.TRUNK_CONV.fullmatch(layers[i].name)]
        assert len(trunk) == 17        # 13 VGG16 convolutions + 4 projections
        for i in trunk:
            conv, bn, scale = layers[i], layers[i + 1], layers[i + 2]
            assert not conv.convolution_param.bias_term and len(conv.param) == 1
            assert (bn.type, scale.type) == ("BatchNorm", "Scale"), conv.name
            assert list(bn.bottom) == list(bn.top) == list(scale.bottom) == list(scale.top) \
                == list(conv.top)
            assert [p.lr_mult for p in bn.param] == [0, 0, 0] and scale.scale_param.bias_term
            assert bn.batch_norm_param.moving_average_fraction == pytest.approx(
                gen.MOVING_AVERAGE_FRACTION)          # a float field
        normalised = {layers[i - 1].name for i, lp in enumerate(layers) if lp.type == "BatchNorm"}
        assert normalised == {layers[i].name for i in trunk}


def test_input_is_32_and_heatmap_targets_follow_it():
    train = _layers("train_val.prototxt")
    assert {lp.transform_param.crop_size for lp in train if lp.type == "Data"} == {32}
    target = next(lp for lp in train if lp.type == "LandmarkHeatmap").landmark_heatmap_param
    assert (target.height, target.width) == (32, 32)
    shape = next(lp for lp in _layers("deploy.prototxt") if lp.type == "Input").input_param.shape
    assert list(shape[0].dim)[2:] == [32, 32]


def test_wide_folder_is_the_generators_output_with_twice_the_trunk_width():
    src, base = ROOT / "models" / gen.SOURCE, ROOT / "models" / gen.TARGET
    wide = ROOT / "models" / gen.target_name(2)
    for name, deploy in (("train_val.prototxt", False), ("deploy.prototxt", True)):
        expected = gen.bn_net((src / name).read_text(encoding="utf-8"), deploy, width=2)
        assert (wide / name).read_text(encoding="utf-8") == expected, name
        one, two = (read_text_proto(d / name, caffe_pb2.NetParameter).layer for d in (base, wide))
        assert [lp.name for lp in one] == [lp.name for lp in two]
        for a, b in zip(one, two):
            trunk = a.type == "Convolution" and gen.TRUNK_CONV.fullmatch(a.name)
            assert b.convolution_param.num_output == a.convolution_param.num_output * \
                (2 if trunk else 1), a.name
            if a.type == "Tile":      # the attention map over pool3's (doubled) channels
                assert b.tile_param.tiles == a.tile_param.tiles * 2
    solver = (wide / "solver_full.prototxt").read_text(encoding="utf-8")
    assert f'net: "models/{gen.target_name(2)}/train_val.prototxt"' in solver
    assert f"max_iter: {gen.WIDE_EPOCHS * 60000 // 64}" in solver


def test_larger_crop_folder_is_the_generators_output_and_its_shapes_meet():
    """--crop 40: the heatmap targets follow the input, the landmark branch's upsampling
    still meets pool2 and the input size, and the attention still meets pool3."""
    from caffe_compat.engine.net.module import build_net
    name = gen.target_name(2, 40)
    src, folder = ROOT / "models" / gen.SOURCE, ROOT / "models" / name
    for file, deploy in (("train_val.prototxt", False), ("deploy.prototxt", True)):
        expected = gen.bn_net((src / file).read_text(encoding="utf-8"), deploy, 2, 40)
        assert (folder / file).read_text(encoding="utf-8") == expected, file
    param = read_text_proto(folder / "deploy.prototxt", caffe_pb2.NetParameter)
    param.layer[0].input_param.shape[0].dim[1] = 1           # grey records
    shapes = build_net(param, caffe_pb2.TEST).blob_shapes
    assert shapes["heatmaps"][2:] == (40, 40)
    assert shapes["att"][2:] == shapes["pool3"][2:] == (5, 5)
    assert shapes["pool5"][2:] == (2, 2)     # Caffe's ceil: 40 20 10 5 3 2
    train = read_text_proto(folder / "train_val.prototxt", caffe_pb2.NetParameter).layer
    target = next(lp for lp in train if lp.type == "LandmarkHeatmap").landmark_heatmap_param
    assert (target.height, target.width) == (40, 40)
    solver = (folder / "solver_full.prototxt").read_text(encoding="utf-8")
    assert "--size 44" in solver and f'net: "models/{name}/train_val.prototxt"' in solver
