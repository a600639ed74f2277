"""tools/annotate_landmarks.py: DeepFashion-format output, overlays, the committed file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from caffe_compat.data.landmarks import read_landmarks
from tool_utils import load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_rectangles(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    img = np.zeros((30, 40, 3), np.uint8)
    img[5:21, 10:31] = 180                          # rows 5..20, columns 10..30
    cv2.imwrite(str(root / "a" / "box.png"), img)
    cv2.imwrite(str(root / "blank.png"), np.zeros((8, 8), np.uint8))
    out = tmp_path / "marks.txt"
    assert load_tool("annotate_landmarks").main([str(root), "-o", str(out), "--overlay",
                                                 str(tmp_path / "ov"), "--zoom", "2"]) == 0
    marks = read_landmarks(out)
    np.testing.assert_array_equal(marks["a/box.png"], [
        [10, 5, 1], [30, 5, 1], [10, 12, 1], [30, 12, 1],
        [10, 12, 1], [30, 12, 1], [10, 20, 1], [30, 20, 1]])
    assert not marks["blank.png"][:, 2].any()
    overlay = cv2.imread(str(tmp_path / "ov" / "a" / "box.png"))
    assert overlay.shape == (60, 80, 3)


def test_committed_landmarks_are_current(tmp_path):
    out = tmp_path / "list_landmarks.txt"
    assert load_tool("annotate_landmarks").main([str(ROOT / "data" / "fashion50"),
                                                 "-o", str(out)]) == 0
    assert out.read_text() == (ROOT / "data" / "fashion50" / "list_landmarks.txt").read_text()
