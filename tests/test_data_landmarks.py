"""Landmarks: DeepFashion files, geometry, LandmarkHeatmap, and silhouette extreme points."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from caffe_compat.data import DataError
from caffe_compat.data.landmarks import (mirror_landmarks, read_landmarks, resize_landmarks,
                                         silhouette_landmarks, write_landmarks)
from caffe_compat.engine.layers import LayerError
from layer_utils import make_layer

DEEPFASHION = """3
image_name  clothes_type  variation_type  landmark_visibility_1 landmark_location_x_1 ...
img/Blouse/img_00000001.jpg 1 1 0 146 102 0 173 095 0 094 242 0 205 255 1 136 229 2 175 232
img/Shorts/img_00000002.jpg 2 2 0 100 50 0 150 51 0 95 200 0 160 201
img/Dress/img_00000003.jpg 3 1 0 1 2 0 3 4 0 5 6 0 7 8 0 9 10 0 11 12 0 13 14 1 15 16
"""


def test_reads_deepfashion_lines_of_every_clothes_type(tmp_path):
    path = tmp_path / "list_landmarks.txt"
    path.write_text(DEEPFASHION)
    marks = read_landmarks(path)
    upper = marks["img/Blouse/img_00000001.jpg"]
    np.testing.assert_array_equal(upper[[0, 1, 2, 3, 6, 7]],
                                  [[146, 102, 1], [173, 95, 1], [94, 242, 1], [205, 255, 1],
                                   [136, 229, 0], [175, 232, 0]])
    assert not upper[4:6].any()                                  # no waist on a blouse
    lower = marks["img/Shorts/img_00000002.jpg"]
    np.testing.assert_array_equal(lower[4:], [[100, 50, 1], [150, 51, 1], [95, 200, 1],
                                              [160, 201, 1]])
    assert not lower[:4].any()
    full = marks["img/Dress/img_00000003.jpg"]
    np.testing.assert_array_equal(full[:, :2].ravel(), np.arange(1, 17))
    np.testing.assert_array_equal(full[:, 2], [1] * 7 + [0])


def test_write_then_read_round_trip(tmp_path):
    lm = np.array([[x, 2 * x, x % 2] for x in range(8)], np.float32)
    write_landmarks(tmp_path / "out.txt", [("a/b.png", lm), ("c.png", lm[::-1])])
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert lines[0] == "2" and lines[1].startswith("image_name clothes_type variation_type")
    assert lines[2].split()[:6] == ["a/b.png", "3", "1", "1", "0", "0"]  # invisible = 1
    back = read_landmarks(tmp_path / "out.txt")
    np.testing.assert_array_equal(back["a/b.png"], lm)
    np.testing.assert_array_equal(back["c.png"], lm[::-1])


@pytest.mark.parametrize("text, message", [
    ("1\nhdr\nimg.png 3 1 0 1\n", r"marks.txt:3: expected"),
    ("img.png 1 1 0 1 2 0 3 4\n", r"marks.txt:1: 2 landmarks do not fit clothes_type 1"),
    ("img.png 3 1 0 x 2\n", r"marks.txt:1: landmark fields must be numbers"),
])
def test_bad_landmark_files(tmp_path, text, message):
    (tmp_path / "marks.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        read_landmarks(tmp_path / "marks.txt")
    with pytest.raises(DataError, match="landmark file does not exist"):
        read_landmarks(tmp_path / "missing.txt")


def test_mirror_swaps_pairs_and_resize_maps_pixel_centres():
    lm = np.array([[0, 1, 1], [9, 2, 0], [3, 3, 1]], np.float32)
    np.testing.assert_array_equal(mirror_landmarks(lm, 10), [[0, 2, 0], [9, 1, 1], [6, 3, 1]])
    np.testing.assert_array_equal(mirror_landmarks(mirror_landmarks(lm, 10), 10), lm)
    np.testing.assert_allclose(resize_landmarks(lm, (10, 10), (20, 40)),
                               [[1.5, 2.5, 1], [37.5, 4.5, 0], [13.5, 6.5, 1]])


# ---------------------------------------------------------------------------- LandmarkHeatmap


def test_heatmap_layer_peaks_at_visible_landmarks():
    lm = torch.tensor([[[3.0, 5.0, 1.0], [10.0, 2.0, 0.0]],
                       [[0.0, 0.0, 1.0], [15.0, 7.0, 1.0]]])
    layer = make_layer('name: "hm" type: "LandmarkHeatmap" bottom: "lm" top: "hm" '
                       'landmark_heatmap_param { height: 8 width: 16 sigma: 1.5 }', [(2, 2, 3)])
    assert layer.top_shapes([(2, 2, 3)]) == [(2, 2, 8, 16)]
    maps = layer(lm)
    assert maps.shape == (2, 2, 8, 16)
    v, u = torch.meshgrid(torch.arange(8.0), torch.arange(16.0), indexing="ij")
    expected = torch.exp(-((u - 3) ** 2 + (v - 5) ** 2) / (2 * 1.5 ** 2))
    torch.testing.assert_close(maps[0, 0], expected)
    assert maps[0, 0, 5, 3] == 1 and not maps[0, 1].any()      # invisible -> zeros
    assert maps[1, 1].argmax() == 7 * 16 + 15


def test_heatmap_layer_scales_from_the_image_blob_and_has_no_gradient():
    lm = torch.tensor([[[63.0, 31.0, 1.0]]], requires_grad=True)
    image = torch.zeros(1, 3, 64, 128)
    layer = make_layer('name: "hm" type: "LandmarkHeatmap" bottom: "lm" bottom: "data" top: "hm" '
                       'landmark_heatmap_param { height: 16 width: 32 }', [(1, 1, 3), (1, 3, 64, 128)])
    maps = layer(lm, image)
    # pixel centre 63 of 128 maps to (63 + 0.5) / 4 - 0.5 = 15.375; sigma = 32 / 32 = 1
    v, u = torch.meshgrid(torch.arange(16.0), torch.arange(32.0), indexing="ij")
    expected = torch.exp(-((u - 15.375) ** 2 + (v - 7.375) ** 2) / 2)
    torch.testing.assert_close(maps[0, 0], expected)
    assert not maps.requires_grad and layer.no_grad_bottoms == (0, 1)
    same = make_layer('name: "hm" type: "LandmarkHeatmap" bottom: "lm" bottom: "data" top: "hm"',
                      [(1, 1, 3), (1, 3, 64, 128)])
    assert same.top_shapes([(1, 1, 3), (1, 3, 64, 128)]) == [(1, 1, 64, 128)]
    assert same(lm, image)[0, 0, 31, 63] == 1


def test_heatmap_layer_errors():
    with pytest.raises(LayerError, match="needs landmark_heatmap_param"):
        make_layer('name: "hm" type: "LandmarkHeatmap" bottom: "lm" top: "hm"', [(2, 8, 3)])
    with pytest.raises(LayerError, match=r"bottom 0 must be landmarks \(N, K, 3\)"):
        make_layer('name: "hm" type: "LandmarkHeatmap" bottom: "lm" top: "hm" '
                   'landmark_heatmap_param { height: 4 width: 4 }', [(2, 8)])


# ---------------------------------------------------------------------------- silhouettes


def shirt(background: int = 0, value: int = 200) -> np.ndarray:
    """A T-shape on a plain background: a trapezoid torso and a bar of sleeves."""
    img = np.full((40, 40), background, np.uint8)
    torso = np.array([[14, 6], [25, 6], [25, 34], [10, 34]], np.int32)
    sleeves = np.array([[4, 8], [35, 8], [35, 14], [4, 14]], np.int32)
    cv2.fillPoly(img, [torso], value)
    cv2.fillPoly(img, [sleeves], value)
    return img


@pytest.mark.parametrize("background, value", [(0, 200), (255, 40), (128, 250)])
def test_silhouette_landmarks_are_the_extreme_points(background, value):
    img = shirt(background, value)
    lm = silhouette_landmarks(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    assert lm[:, 2].all()
    # box rows 6..34, so the waist row is 20; the torso's slanted left edge crosses it at
    # x = 14 - 4·14/28 = 12
    np.testing.assert_array_equal(lm[:, :2], [
        [4, 8],      # left collar: min x+y, the sleeves' top-left corner
        [35, 8],     # right collar: min y-x
        [4, 11],     # left sleeve: leftmost column (rows 8..14), middle of the ties
        [35, 11],    # right sleeve
        [12, 20],    # left waist
        [25, 20],    # right waist
        [10, 34],    # left hem: max y-x
        [25, 34],    # right hem: max x+y
    ])
    assert np.array_equal(silhouette_landmarks(img), lm)      # grey input, same points


def test_blank_image_has_no_visible_landmarks():
    assert not silhouette_landmarks(np.full((20, 20, 3), 7, np.uint8)).any()


def test_largest_region_wins():
    img = np.zeros((30, 30), np.uint8)
    img[2:5, 2:5] = 255                  # speck
    img[10:25, 8:20] = 255               # garment
    lm = silhouette_landmarks(img)
    np.testing.assert_array_equal(lm[:, :2], [[8, 10], [19, 10], [8, 17], [19, 17],
                                              [8, 17], [19, 17], [8, 24], [19, 24]])
