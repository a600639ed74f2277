"""WindowData against hand-worked crops (window_data_layer.cpp's arithmetic).

The image's channel 0 holds 10·x and channel 1 holds 10·y, so a crop that is not resized
can be written down directly; for resized crops the geometry (box, size, padding) is
worked out by hand from Caffe's formulas and the pixels compared with OpenCV's bilinear
resize of that box.
"""
import cv2
import numpy as np
import pytest

from caffe_compat.data.window_data import read_window_file, window_geometry
from caffe_compat.formats.blob_io import write_blobproto
from caffe_compat.formats.errors import DataError
from layer_utils import make_layer

W, H = 20, 16


def _image():
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([10 * x, 10 * y, np.full_like(x, 77)], axis=2).astype(np.uint8)


def _setup(tmp_path, windows, fg=0.5, batch=2, crop=6, extra="", transform=""):
    cv2.imwrite(str(tmp_path / "a.png"), _image())
    lines = ["# 0", "a.png", "3", str(H), str(W), str(len(windows))]
    lines += [" ".join(map(str, w)) for w in windows]
    (tmp_path / "windows.txt").write_text("\n".join(lines) + "\n")
    text = (f'name: "w" type: "WindowData" top: "data" top: "label" '
            f'window_data_param {{ source: "{tmp_path}/windows.txt" root_folder: "{tmp_path}/" '
            f'batch_size: {batch} fg_fraction: {fg} fg_threshold: 0.5 bg_threshold: 0.3 {extra} }} '
            f'transform_param {{ crop_size: {crop} {transform} }}')
    return make_layer(text, [])


FG = (7, 0.8, 2, 3, 7, 8)      # label overlap x1 y1 x2 y2: a 6×6 foreground window
BG = (3, 0.1, 10, 4, 15, 9)    # background: its label becomes 0


def test_warp_without_resize_copies_the_window(tmp_path):
    layer = _setup(tmp_path, [FG, BG])
    data, label = (t.numpy() for t in layer())
    assert data.shape == (2, 3, 6, 6) and label.tolist() == [0, 7]     # bg first, then fg
    np.testing.assert_array_equal(data[0, 0], np.tile(10 * np.arange(10, 16), (6, 1)))
    np.testing.assert_array_equal(data[1, 0], np.tile(10 * np.arange(2, 8), (6, 1)))
    np.testing.assert_array_equal(data[1, 1], np.tile(10 * np.arange(3, 9)[:, None], (1, 6)))


def test_fg_fraction_and_unused_middle_overlaps(tmp_path):
    middle = (9, 0.4, 0, 0, 5, 5)           # between bg_threshold and fg_threshold: dropped
    layer = _setup(tmp_path, [FG, BG, middle], fg=0.25, batch=4)
    assert len(layer.fg) == 1 and len(layer.bg) == 1
    _, label = layer()
    assert label.tolist() == [0, 0, 0, 7]   # int(4 * 0.25) = 1 foreground, placed last


def test_mirror_flips_and_scale_and_mean_value(tmp_path):
    layer = _setup(tmp_path, [FG, BG], extra="scale: 0.5",
                   transform="mirror: true mean_value: 4 mean_value: 6 mean_value: 7")
    flips = set()
    for _ in range(12):
        data = layer()[0].numpy()[1]
        plain = (np.tile(10 * np.arange(2, 8), (6, 1)) - 4) * 0.5
        if np.array_equal(data[0], plain):
            flips.add(False)
        else:
            np.testing.assert_array_equal(data[0], plain[:, ::-1])
            flips.add(True)
        np.testing.assert_array_equal(data[2], np.full((6, 6), (77 - 7) * 0.5))
    assert flips == {False, True}


def test_context_pad_geometry_by_hand():
    # 6×6 window at (2,3)-(7,8), crop 8, pad 1: scale 8/6, half 3, centre (5, 6) →
    # box x 5±4 = 1..9, y 6±4 = 2..10; 9×9 resized by 8/9 to round(8) = 8.
    assert window_geometry((2, 3, 7, 8), (H, W), 8, 1, False, False) == \
        ((1, 2, 9, 10), (8, 8), (0, 0))
    # At the corner (0,0)-(5,5): box -1..7 clipped to 0..7 (one column/row outside);
    # size round(8·8/9) = 7, pad round(1·8/9) = 1 on the top and the left ...
    assert window_geometry((0, 0, 5, 5), (H, W), 8, 1, False, False) == \
        ((0, 0, 7, 7), (7, 7), (1, 1))
    # ... and on the right when mirrored, where nothing was clipped: pad_w 0.
    assert window_geometry((0, 0, 5, 5), (H, W), 8, 1, False, True) == \
        ((0, 0, 7, 7), (7, 7), (1, 0))
    # square: a 4-wide, 8-tall window grows to 8×8 about its centre (x 2+2=4, y 2+4=6).
    assert window_geometry((2, 2, 5, 9), (H, W), 8, 0, True, False) == \
        ((0, 2, 8, 10), (8, 8), (0, 0))


def test_context_pad_leaves_outside_pixels_zero_before_mean(tmp_path):
    corner = (5, 0.9, 0, 0, 5, 5)
    layer = _setup(tmp_path, [corner, BG], crop=8, extra="context_pad: 1",
                   transform="mean_value: 100")
    data = layer()[0].numpy()[1]
    assert not data[:, 0, :].any() and not data[:, :, 0].any()   # padding stays 0, not -mean
    expected = cv2.resize(_image()[0:8, 0:8], (7, 7), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(data[:, 1:, 1:], expected.transpose(2, 0, 1) - 100.0)


def test_mean_file_uses_its_centre_shifted_by_the_padding(tmp_path):
    mean = np.arange(3 * 10 * 10, dtype=np.float32).reshape(3, 10, 10)
    write_blobproto(tmp_path / "mean.binaryproto", mean)
    layer = _setup(tmp_path, [FG, BG], transform=f'mean_file: "{tmp_path}/mean.binaryproto"')
    data = layer()[0].numpy()[1]
    window = _image()[3:9, 2:8].transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(data, window - mean[:, 2:8, 2:8])   # offset (10 - 6) / 2


def test_window_file_errors(tmp_path):
    (tmp_path / "bad.txt").write_text("# 0\na.png\n3\n16\n20\n1\n0 0.9 0 0 5 5\n")
    with pytest.raises(DataError, match="foreground labels must be > 0"):
        read_window_file(str(tmp_path / "bad.txt"), "", 0.5, 0.5)
    (tmp_path / "short.txt").write_text("# 0\na.png\n3\n16\n")
    with pytest.raises(DataError, match="truncated or malformed"):
        read_window_file(str(tmp_path / "short.txt"), "", 0.5, 0.5)
    with pytest.raises(DataError, match="cannot open window file"):
        read_window_file(str(tmp_path / "none.txt"), "", 0.5, 0.5)


def test_needs_crop_size_and_both_window_kinds(tmp_path):
    from caffe_compat.engine.layers.base import LayerError
    with pytest.raises(LayerError, match="crop_size must be set"):
        _setup(tmp_path, [FG, BG], crop=0)
    with pytest.raises(LayerError, match="needs both foreground"):
        _setup(tmp_path, [FG])
