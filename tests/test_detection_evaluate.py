"""SSD's DetectionEvaluate layer and the solver's ``eval_type: "detection"`` test (mAP).

Every expected value is worked out by hand here from the fork's definitions: which detection
is a true or false positive, each class's count of boxes, the AP of each ``ap_version``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat as caffe
from caffe_compat.engine.layers import base as layer_base
from caffe_compat.engine.layers.base import Layer, LayerError, layer_class
from caffe_compat.engine.layers.ssd_evaluate import to_image
from caffe_compat.engine.solver import events as solver_events
from caffe_compat.engine.solver.detection_eval import average_precision
from caffe_compat.engine.solver.params import SolverParamError
from caffe_compat.formats import glog
from caffe_compat.proto import caffe_pb2

G1, G2, G3 = [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.2, 0.6, 0.5, 0.9]
GT = [[0, 1, 0, *G1, 0], [0, 1, 1, *G2, 1],          # image 0: class 1 (G2 difficult), class 2
      [0, 2, 2, *G3, 0], [1, 2, 0, 0.0, 0.0, 0.5, 0.5, 0]]
DET = [[2, 2, 0.4, 0.1, 0.1, 0.2, 0.2],              # image 2 has no box: false positive
       [0, 1, 0.7, *G2],                             # the difficult box
       [0, 1, 0.8, 0.12, 0.1, 0.42, 0.4],            # G1 again (IoU 0.875): a duplicate
       [0, 2, 0.6, 0.25, 0.6, 0.55, 0.9],            # G3, IoU 0.714
       [0, 1, 0.9, *G1],                             # G1 exactly
       [3, -1, -1, -1, -1, -1, -1],                  # DetectionOutput's "nothing found"
       [1, 1, 0.5, 0.0, 0.0, 0.5, 0.5],              # image 1 has no class-1 box
       [0, 1, 0.95, 0.0, 0.6, 0.1, 0.7]]             # overlaps nothing


def _layer(params: str = "", det_rows: int = len(DET), gt_rows: int = len(GT)):
    text = (f'name: "eval" type: "DetectionEvaluate" detection_evaluate_param {{ '
            f'num_classes: 3 background_label_id: 0 {params} }}')
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class("DetectionEvaluate")(lp, [(1, 1, det_rows, 7), (1, 1, gt_rows, 8)], 1)


def _run(lay, det=DET, gt=GT) -> list[list[float]]:
    out = lay(torch.tensor(det, dtype=torch.float32).view(1, 1, -1, 7),
              torch.tensor(gt, dtype=torch.float32).view(1, 1, -1, 8))
    assert out.shape[:2] == (1, 1) and out.shape[3] == 5
    return np.round(out.numpy().reshape(-1, 5).astype(np.float64), 6).tolist()


def _rows(difficult_mark, class1_boxes):
    return [[-1, 1, class1_boxes, -1, -1], [-1, 2, 2, -1, -1],
            [0, 1, 0.95, 0, 1], [0, 1, 0.9, 1, 0], [0, 1, 0.8, 0, 1], [0, 1, 0.7, *difficult_mark],
            [0, 2, 0.6, 1, 0], [1, 1, 0.5, 0, 1], [2, 2, 0.4, 0, 1]]


def test_marks_true_and_false_positives_with_difficult_boxes_evaluated():
    assert _run(_layer()) == _rows([1, 0], 2)


def test_difficult_boxes_ignored_leave_their_detection_unscored():
    assert _run(_layer("evaluate_difficult_gt: false")) == _rows([0, 0], 1)


@pytest.mark.parametrize("threshold, mark", [(0.8, [1, 0]), (0.9, [0, 1])])
def test_overlap_threshold_decides(threshold, mark):
    det = [[0, 1, 0.5, 0.12, 0.1, 0.42, 0.4]]        # IoU 0.875 with G1
    rows = _run(_layer(f"overlap_threshold: {threshold}", 1), det)
    assert rows[2] == [0, 1, 0.5, *mark]


def test_background_label_in_data_is_an_error():
    with pytest.raises(LayerError, match="background label"):
        _run(_layer(), [[0, 0, 0.5, *G1]])
    with pytest.raises(LayerError, match="num_classes"):
        layer_class("DetectionEvaluate")(text_format.Parse(
            'name: "e" type: "DetectionEvaluate"', caffe_pb2.LayerParameter()),
            [(1, 1, 1, 7), (1, 1, 1, 8)], 1)


def test_name_size_file_measures_in_pixels(tmp_path):
    # In a 100×200 image G1 is [20, 10, 80, 40] (61×31 pixels) and the detection [20, 10, 80,
    # 50] (61×41): IoU 1891/2501 = 0.7561 in pixels, 0.09/0.12 = 0.75 normalised.
    sizes = tmp_path / "sizes.txt"
    sizes.write_text("a 100 200\nb 100 200\n")
    det = [[0, 1, 0.5, 0.1, 0.1, 0.4, 0.5]]
    threshold = "overlap_threshold: 0.755"
    assert _run(_layer(threshold, 1), det)[2] == [0, 1, 0.5, 0, 1]
    lay = _layer(f'{threshold} name_size_file: "{sizes}"', 1)
    assert _run(lay, det)[2] == [0, 1, 0.5, 1, 0]
    assert lay.count == 1                      # one image with detections: next size
    _run(lay, det)
    assert lay.count == 0                      # wrapped at the end of the file


def test_fit_large_size_and_pad_undoes_the_padding():
    # A 100×200 image padded into 300×300: its content spans y in [0.25, 0.75].
    resize = caffe_pb2.ResizeParameter(resize_mode=caffe_pb2.ResizeParameter.FIT_LARGE_SIZE_AND_PAD,
                                       height=300, width=300)
    boxes, sizes = to_image(np.array([[0.1, 0.3, 0.5, 0.5]], np.float32), 100, 200, resize)
    np.testing.assert_allclose(boxes, [[20, 10, 100, 50]], rtol=1e-6)
    np.testing.assert_allclose(sizes, [81 * 41], rtol=1e-6)


# ---------------------------------------------------------------- AP by hand
# Ranked TP, FP, FP, TP, TP against 4 boxes: precision 1, 1/2, 1/3, 1/2, 3/5 at recall
# 1/4, 1/4, 1/4, 1/2, 3/4.
SCORES, TP = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 0, 1, 1]
HAND_AP = {
    "Integral": 0.25 * 1 + 0.25 * 0.5 + 0.25 * 0.6,          # precision where recall grew
    "MaxIntegral": 0.25 * 1 + 0.25 * 0.6 + 0.25 * 0.6,       # the envelope: 0.6 from 1/2 on
    "11point": (3 * 1 + 5 * 0.6) / 11,                       # t <= 0.2: 1; 0.3..0.7: 0.6
}


@pytest.mark.parametrize("version", sorted(HAND_AP))
def test_average_precision_by_hand(version):
    shuffled = [4, 0, 3, 1, 2]                 # input order must not matter
    ap = average_precision([SCORES[i] for i in shuffled], [TP[i] for i in shuffled],
                           [1 - TP[i] for i in shuffled], 4, version)
    assert ap == pytest.approx(HAND_AP[version], abs=1e-6)


def test_equal_scores_keep_their_order():
    assert average_precision([0.5, 0.5], [0, 1], [1, 0], 1, "Integral") == pytest.approx(0.5)
    assert average_precision([0.5, 0.5], [1, 0], [0, 1], 1, "Integral") == pytest.approx(1.0)


def test_eleven_point_compares_float_recall():
    # 7 of 10 boxes found, all first: recall 7/10 in float32 is 0.69999999, below the double
    # 0.7, so the fork credits t = 0 .. 0.6 only: 7/11, not 8/11.
    assert average_precision([1.0] * 7, [1] * 7, [0] * 7, 10, "11point") == pytest.approx(7 / 11)


def test_no_detection_or_no_box_gives_zero():
    assert average_precision([], [], [], 3, "Integral") == 0.0
    assert average_precision([0.3], [0], [1], 0, "11point") == 0.0


# ---------------------------------------------------------------- the solver's test pass
A, B, C, D = [0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8], [0.4, 0.1, 0.6, 0.3], [0.2, 0.2, 0.5, 0.5]
BATCHES = [  # (detections, ground truth) of each test batch
    ([[0, 1, 0.9, *A], [0, 1, 0.8, 0.1, 0.12, 0.3, 0.32], [0, 2, 0.7, *C]],
     [[0, 1, 0, *A, 0], [0, 1, 1, *B, 0], [0, 2, 2, *C, 0]]),
    ([[0, 1, 0.6, *D], [0, 2, 0.65, *B]],
     [[0, 1, 0, *D, 0], [0, 2, 1, *B, 1]]),      # class 2's box here is difficult
]
# Class 1 ranks TP, FP, TP against 3 boxes: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3.
# Class 2: one TP against 1 box (the difficult one ignored): AP 1.
CLASS1 = {"11point": (4 * 1 + 3 * 2 / 3) / 11, "MaxIntegral": 1 / 3 + 1 / 3 * 2 / 3,
          "Integral": 1 / 3 + 1 / 3 * 2 / 3}


class _Rows(Layer):
    """Serves BATCHES in turn: ``[1, 1, D, 7]`` detections and ``[1, 1, G, 8]`` boxes."""
    type = "TestDetectionRows"
    num_bottoms, num_tops = (0, 0), (2, 2)

    def top_shapes(self, bottom_shapes):
        return [(1, 1, 3, 7), (1, 1, 3, 8)]

    def forward(self):
        self.served = getattr(self, "served", -1) + 1
        batch = BATCHES[self.served % len(BATCHES)]
        return tuple(torch.tensor(rows, dtype=torch.float32)[None, None] for rows in batch)


TRAIN_NET = """
layer { name: "x" type: "DummyData" top: "x" top: "y" dummy_data_param { shape { dim: 2 dim: 3 }
  shape { dim: 2 dim: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""
TEST_NET = """
layer { name: "rows" type: "TestDetectionRows" top: "det" top: "label" }
layer { name: "eval" type: "DetectionEvaluate" bottom: "det" bottom: "label" top: "detection_eval"
  detection_evaluate_param { num_classes: 3 background_label_id: 0 evaluate_difficult_gt: false } }
"""


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.setitem(layer_base._REGISTRY, _Rows.type, _Rows)
    monkeypatch.setenv("GLOG_minloglevel", "0")
    monkeypatch.chdir(tmp_path)
    Path("train.prototxt").write_text(TRAIN_NET)
    Path("test.prototxt").write_text(TEST_NET)


def _solver(extra: str, eval_type: str = "detection"):
    Path("solver.prototxt").write_text(
        'train_net: "train.prototxt"\ntest_net: "test.prototxt"\ntest_iter: 2\n'
        'test_interval: 1\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 1\n'
        f'snapshot_after_train: false\neval_type: "{eval_type}"\n' + extra)
    return caffe.get_solver("solver.prototxt")


@pytest.mark.parametrize("version", sorted(CLASS1))
def test_solver_logs_and_emits_map(in_tmp, version):
    solver = _solver(f'ap_version: "{version}"\nshow_per_class_result: true\n')
    events, lines = [], []
    solver.subscribe(events.append, solver_events.TestDone)
    glog.set_echo(lines.append)
    try:
        solver.solve()
    finally:
        glog.set_echo(None)
    expected = (CLASS1[version] + 1) / 2
    assert [e.iter for e in events] == [0, 1]          # test_initialization, then the end
    for event in events:
        assert event.scalar("detection_eval") == pytest.approx(expected, abs=1e-6)
    said = [line.split("] ", 1)[1] for line in lines]
    assert said.count(f"    Test net output #0: detection_eval = {expected:g}") == 2
    assert said.count(f"class1: {CLASS1[version]:g}") == 2 and said.count("class2: 1") == 2


def test_a_class_without_detections_counts_zero(in_tmp):
    Path("test.prototxt").write_text(TEST_NET.replace("num_classes: 3", "num_classes: 4"))
    solver = _solver('ap_version: "Integral"\n')
    assert solver.test(0) == pytest.approx([(CLASS1["Integral"] + 1) / 3], abs=1e-6)


def test_detection_needs_evaluate_rows(in_tmp):
    Path("test.prototxt").write_text(TEST_NET.replace('top: "detection_eval"', 'top: "e"') +
                                     'layer { name: "s" type: "Reduction" bottom: "e" top: "s" }')
    with pytest.raises(ValueError, match="DetectionEvaluate's"):
        _solver("").test(0)


def test_unknown_settings_are_refused(in_tmp):
    with pytest.raises(SolverParamError, match="Unknown ap_version: VOC"):
        _solver('ap_version: "VOC"\n')
    with pytest.raises(SolverParamError, match="Unknown evaluation type: ranking"):
        _solver("", eval_type="ranking")
