"""experiments/landmark_eval.py: heatmap argmax, pixel errors, the mean-position baseline, the PNG."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from caffe_compat import pycaffe
from caffe_compat.data.db import DBWriter
from caffe_compat.formats.blob_io import array_to_datum
from caffe_compat.formats.errors import DataError
from experiments import landmark_eval as le

# Heatmaps = the input itself: each input channel is one landmark's map.
IDENTITY_DEPLOY = """
name: "identity"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 2 dim: 8 dim: 8 } } }
layer { name: "copy" type: "Power" bottom: "data" top: "heatmaps" }
"""


def test_argmax_finds_known_peaks_as_column_row():
    maps = np.random.default_rng(0).uniform(0, 0.5, size=(2, 3, 5, 7)).astype(np.float32)
    peaks = [[(6, 0), (0, 4), (3, 2)], [(1, 1), (5, 3), (2, 4)]]   # (x = column, y = row)
    for n, row in enumerate(peaks):
        for k, (x, y) in enumerate(row):
            maps[n, k, y, x] = 2.0
    np.testing.assert_array_equal(le.heatmap_argmax(maps), np.asarray(peaks, np.float32))


def test_argmax_of_a_flat_map_is_its_first_pixel():
    assert le.heatmap_argmax(np.zeros((1, 1, 4, 4))).tolist() == [[[0.0, 0.0]]]


def test_map_to_input_maps_pixel_centres():
    xy = np.array([[[0.0, 0.0], [63.0, 31.5]]], np.float32)
    out = le.map_to_input(xy, (64, 64), (224, 224))
    s = 224 / 64
    np.testing.assert_allclose(out, [[[0.5 * s - 0.5, 0.5 * s - 0.5],
                                      [63.5 * s - 0.5, 32.0 * s - 0.5]]], rtol=1e-6)
    np.testing.assert_array_equal(le.map_to_input(xy, (64, 64), (64, 64)), xy)


def test_errors_skip_invisible_landmarks():
    targets = np.array([[[0, 0, 1], [10, 10, 0]], [[3, 4, 1], [1, 1, 1]]], np.float32)
    pred = np.array([[[3, 4], [0, 0]], [[0, 0], [1, 1]]], np.float32)
    err = le.landmark_errors(pred, targets)
    assert err[0, 0] == 5 and np.isnan(err[0, 1]) and err[1, 0] == 5 and err[1, 1] == 0
    report = le.summarize(err, err * 2)
    assert report.visible == 3 and report.net_px == pytest.approx(10 / 3)
    assert report.baseline_px == pytest.approx(20 / 3)
    assert report.net_median_px == 5 and report.net_within_3px == pytest.approx(1 / 3)


def test_outside_input_marks_targets_beyond_the_border():
    marks = np.array([[[0, 0, 1], [-0.5, 3, 1], [7, 8, 1], [7, 7, 1]]], np.float32)
    assert le.outside_input(marks, (8, 8)).tolist() == [[False, True, True, False]]
    err = np.ones((1, 4))
    assert le.summarize(err, err, le.outside_input(marks, (8, 8))).outside_input == 0.5


def test_mean_landmarks_average_visible_positions_only():
    marks = np.array([[[2, 4, 1], [100, 100, 0]], [[4, 8, 1], [6, 2, 1]]], np.float32)
    np.testing.assert_allclose(le.mean_landmarks(marks), [[3, 6], [6, 2]])
    marks[:, 1, 2] = 0
    with pytest.raises(DataError, match="right_collar"):
        le.mean_landmarks(marks)


def _dot_records(path, points, side=10):
    """Records with 2 channels: channel k has one bright pixel at landmark k."""
    with DBWriter(path, "lmdb") as db:
        for i, pts in enumerate(points):
            img = np.zeros((2, side, side), np.uint8)
            lm = []
            for k, (x, y) in enumerate(pts):
                img[k, y, x] = 200
                lm += [x, y, 1]
            datum = array_to_datum(img, i % 2)
            datum.float_data.extend(lm)
            db.put(f"{i:08d}", datum.SerializeToString())


TEST_POINTS = [[(2, 3), (7, 6)], [(4, 4), (5, 8)], [(1, 7), (8, 2)]]
TRAIN_POINTS = [[(3, 3), (6, 5)], [(5, 5), (6, 7)]]


def test_perfect_heatmaps_beat_the_mean_position_baseline(tmp_path):
    _dot_records(tmp_path / "test", TEST_POINTS)
    _dot_records(tmp_path / "train", TRAIN_POINTS)
    (tmp_path / "deploy.prototxt").write_text(IDENTITY_DEPLOY)
    net = pycaffe.Net(str(tmp_path / "deploy.prototxt"), pycaffe.TEST)
    ev = le.evaluate(net, le.read_records(tmp_path / "test"), le.read_records(tmp_path / "train"),
                     None, 1.0)
    # the 8×8 centre crop of a 10×10 record moves every landmark by (−1, −1)
    expected = np.asarray(TEST_POINTS, np.float32) - 1
    np.testing.assert_array_equal(ev.landmarks[..., :2], expected)
    np.testing.assert_array_equal(ev.pred_xy, expected)
    assert ev.report.net_px == 0 and ev.report.net_within_3px == 1
    mean = np.asarray(TRAIN_POINTS, np.float64).mean(axis=0) - 1      # [[3, 3], [5, 5]]
    np.testing.assert_allclose(ev.baseline_xy, mean)
    expected_base = np.linalg.norm(expected - mean, axis=-1).mean()
    assert ev.report.baseline_px == pytest.approx(expected_base, rel=1e-6)


def test_command_prints_the_errors_and_writes_the_png(tmp_path, capsys):
    _dot_records(tmp_path / "test", TEST_POINTS)
    _dot_records(tmp_path / "train", TRAIN_POINTS)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(IDENTITY_DEPLOY)
    pycaffe.Net(str(deploy), pycaffe.TEST).save(str(tmp_path / "w.caffemodel"))
    png, report = tmp_path / "out" / "maps.png", tmp_path / "r.json"
    rc = le.main(["--model", str(deploy), "--weights", str(tmp_path / "w.caffemodel"),
                  "--test-db", str(tmp_path / "test"), "--train-db", str(tmp_path / "train"),
                  "--mean-file", "", "--scale", "1", "--png", str(png), "--count", "2",
                  "--json", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mean 0.00" in out and "baseline (mean positions)" in out
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 100 and img.std() > 0
    assert '"net_px": 0.0' in report.read_text()


def test_command_reports_a_missing_database_in_one_line(tmp_path, capsys):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(IDENTITY_DEPLOY)
    pycaffe.Net(str(deploy), pycaffe.TEST).save(str(tmp_path / "w.caffemodel"))
    rc = le.main(["--model", str(deploy), "--weights", str(tmp_path / "w.caffemodel"),
                  "--test-db", str(tmp_path / "nope"), "--mean-file", ""])
    err = capsys.readouterr().err
    assert rc == 1 and "landmark_eval.py: error:" in err and "nope" in err
    assert "Traceback" not in err
