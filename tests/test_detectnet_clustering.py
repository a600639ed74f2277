"""DIGITS' DetectNet Python layers (``caffe.layers.detectnet.clustering`` / ``.mean_ap``, as
NVIDIA/caffe names them) through ``type: "Python"`` layers of small DetectNet-like nets, in the
style of DIGITS' deploy and validation prototxt. Expected rectangles are written by hand and
re-derived with numpy + cv2.groupRectangles on the same proposals; ``caffe.layers`` stays
NetSpec's factory in the same process."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe
import caffe_compat

STRIDE, GRID_H, GRID_W = 16, 4, 8                    # a 128 x 64 image, 16-pixel cells
DEPLOY_PARAMS = "128, 64, 16, 0.6, 1, 0.2, 10"       # threshold 0.6, groups of >1, eps 0.2

# cell (row, col) -> (coverage, absolute rectangle x1, y1, x2, y2 the cell regresses)
OBJECT_A = {(1, 1): (0.9, (20.7, 18.2, 60.5, 50.9)), (1, 2): (0.8, (22.3, 16.8, 58.1, 52.4)),
            (1, 3): (0.7, (18.9, 20.6, 62.0, 48.0))}       # truncated mean: 20 18 60 50
OBJECT_B = {(2, 6): (0.8, (100.4, 30.9, 124.2, 62.5)),
            (2, 7): (0.65, (102.6, 32.1, 122.8, 60.3))}    # truncated mean: 101 31 123 61
BELOW_THRESHOLD = {(0, 5): (0.3, (101.0, 31.0, 123.0, 61.0))}  # would make B a 3-vote group
LONE = {(3, 0): (0.95, (2.5, 50.0, 14.0, 63.0))}               # 1 vote: not more than 1
SHORT = {(3, 3): (0.9, (60.0, 56.0, 80.0, 62.0)),
         (3, 4): (0.9, (60.2, 56.4, 80.1, 62.9))}             # 2 votes, 6 px < min_height 10
CELLS = {**OBJECT_A, **OBJECT_B, **BELOW_THRESHOLD, **LONE, **SHORT}
EXPECTED = [[20, 18, 60, 50, math.log(3)], [101, 31, 123, 61, math.log(2)]]


def maps(cells, batch=2):
    """Coverage (N x 1 x H x W) and bbox (N x 4 x H x W) maps holding ``cells`` in image 0;
    the regressions are the rectangles relative to each cell's top-left corner."""
    coverage = np.zeros((batch, 1, GRID_H, GRID_W), np.float32)
    bboxes = np.zeros((batch, 4, GRID_H, GRID_W), np.float32)
    for (row, col), (value, rect) in cells.items():
        coverage[0, 0, row, col] = value
        corner = np.array([col, row, col, row], np.float64) * STRIDE
        bboxes[0, :, row, col] = np.asarray(rect) - corner
    return coverage, bboxes


def reference_rows(cells, threshold=0.6, group=1, eps=0.2, min_height=10):
    """The same clustering, independently: proposals in row-major cell order, truncated to
    ints, handed to cv2.groupRectangles in DetectNet's (x1, y1, x2, y2) slots."""
    rects = [[int(v) for v in rect] for (_, _), (cvg, rect) in sorted(cells.items())
             if cvg >= threshold]
    merged, weights = cv2.groupRectangles(rects, group, eps)
    return np.array(sorted([*map(float, r), math.log(int(w))] for r, w in
                           zip(np.reshape(merged, (-1, 4)), np.reshape(weights, -1))
                           if r[3] - r[1] >= min_height))


def rows_of(image_rows):
    """The non-padding rows of one image, sorted (the layers keep OpenCV's cluster order)."""
    return np.array(sorted(row.tolist() for row in image_rows if np.any(row != 0)))


def approx(rows, abs=1e-6):
    return pytest.approx(np.asarray(rows, dtype=np.float64), abs=abs)


def write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def input_layer(blobs):
    shapes = "".join(f" shape {{ {''.join(f'dim: {d} ' for d in shape)}}}"
                     for shape in blobs.values())
    tops = "".join(f' top: "{name}"' for name in blobs)
    return f'layer {{ name: "input" type: "Input"{tops} input_param {{{shapes} }} }}\n'


def python_layer(name, module, cls, bottoms, tops, param_str=""):
    return (f'layer {{ name: "{name}" type: "Python"'
            + "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)
            + f' python_param {{ module: "caffe.layers.detectnet.{module}" layer: "{cls}"'
            + f' param_str: "{param_str}" }} }}\n')


def deploy_net(tmp_path, param_str=DEPLOY_PARAMS, tops=("bbox-list",), batch=2, classes=1):
    text = (input_layer({"coverage": (batch, classes, GRID_H, GRID_W),
                         "bboxes": (batch, 4, GRID_H, GRID_W)})
            + python_layer("cluster", "clustering", "ClusterDetections",
                           ("coverage", "bboxes"), tops, param_str))
    return caffe.Net(write(tmp_path, text), caffe.TEST)


def run(net, **inputs):
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    return net.forward()


def test_reference_agrees_with_the_hand_values():
    assert reference_rows(CELLS) == approx(sorted(EXPECTED))


def test_deploy_clusters_merge_duplicates_and_drop_weak_lone_and_short_groups(tmp_path):
    net = deploy_net(tmp_path)
    coverage, bboxes = maps(CELLS)
    out = run(net, coverage=coverage, bboxes=bboxes)["bbox-list"]
    assert out.shape == (2, 50, 5)                         # max_boxes defaults to 50
    assert rows_of(out[0]) == approx(sorted(EXPECTED))
    assert np.count_nonzero(np.any(out[0] != 0, axis=1)) == 2
    assert not out[0, 2:].any() and not out[1].any()      # zero padding; empty image: zeros
    # a second batch with nothing covered clears the previous rows
    out = run(net, coverage=np.zeros_like(coverage), bboxes=bboxes)["bbox-list"]
    assert not out.any()


def test_max_boxes_pads_to_its_size_and_keeps_the_most_confident(tmp_path):
    net = deploy_net(tmp_path, DEPLOY_PARAMS + ", 1, 3")
    coverage, bboxes = maps(CELLS)
    out = run(net, coverage=coverage, bboxes=bboxes)["bbox-list"]
    assert out.shape == (2, 3, 5) and rows_of(out[0]) == approx(sorted(EXPECTED))
    one = deploy_net(tmp_path, DEPLOY_PARAMS + ", 1, 1")
    out = run(one, coverage=coverage, bboxes=bboxes)["bbox-list"]
    assert out.shape == (2, 1, 5) and out[0, 0] == pytest.approx(EXPECTED[0])  # log 3 > log 2


def test_threshold_group_size_and_min_height_come_from_param_str(tmp_path):
    coverage, bboxes = maps(CELLS)
    # threshold 0.25 lets the weak cell vote for B; group 0 keeps every proposal as it is
    for params, kwargs in (("128,64,16,0.25,1,0.2,10", dict(threshold=0.25)),
                           ("128,64,16,0.6,2,0.2,10", dict(group=2)),
                           ("128,64,16,0.6,1,0.2,5", dict(min_height=5)),
                           ("128,64,16,0.6,0,0.2,10", dict(group=0))):
        out = run(deploy_net(tmp_path, params), coverage=coverage, bboxes=bboxes)["bbox-list"]
        assert rows_of(out[0]) == approx(reference_rows(CELLS, **kwargs)), params
    out = run(deploy_net(tmp_path, "128,64,16,0.25,1,0.2,10"), coverage=coverage,
              bboxes=bboxes)["bbox-list"]
    assert rows_of(out[0])[1] == approx([101, 31, 123, 61, math.log(3)])


def test_one_top_per_class_sharing_the_bbox_map(tmp_path):
    coverage, bboxes = maps(CELLS)
    second = np.zeros_like(coverage)
    for row, col in OBJECT_B:
        second[0, 0, row, col] = 0.9
    for row, col in OBJECT_A:
        second[0, 0, row, col] = 0.1
    net = deploy_net(tmp_path, DEPLOY_PARAMS + ", 2", ("bbox-list-class0", "bbox-list-class1"),
                     classes=2)
    out = run(net, coverage=np.concatenate([coverage, second], axis=1), bboxes=bboxes)
    assert rows_of(out["bbox-list-class0"][0]) == approx(sorted(EXPECTED))
    assert rows_of(out["bbox-list-class1"][0]) == approx([EXPECTED[1]])


DETECTNET_LIKE = """name: "detectnet_like"
layer { name: "deploy_data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 5 dim: 64 dim: 128 } } }
layer { name: "cvg/classifier" type: "Convolution" bottom: "data" top: "cvg/classifier"
  convolution_param { num_output: 1 kernel_size: 16 stride: 16 } }
layer { name: "coverage/sig" type: "Sigmoid" bottom: "cvg/classifier" top: "coverage" }
layer { name: "bbox/regressor" type: "Convolution" bottom: "data" top: "bboxes"
  convolution_param { num_output: 4 kernel_size: 16 stride: 16 } }
layer { name: "cluster" type: "Python" bottom: "coverage" bottom: "bboxes" top: "bbox-list"
  python_param { module: "caffe.layers.detectnet.clustering" layer: "ClusterDetections"
                 param_str: "128, 64, 16, 0.6, 1, 0.2, 10, 1" } }
"""


def test_a_detectnet_like_deploy_net_from_image_to_rectangles(tmp_path):
    """Stride-16 convolutions average each cell of a 5-channel image: channel 0 holds the
    coverage logit, channels 1-4 the regressions; the sigmoid gives the coverage."""
    net = caffe.Net(write(tmp_path, DETECTNET_LIKE), caffe.TEST)
    coverage, bboxes = maps(CELLS, batch=1)
    logits = np.log(coverage / (1 - coverage) + 1e-30).clip(-30, 30)
    cell_maps = np.concatenate([logits, bboxes], axis=1)[0]
    image = np.stack([np.kron(m, np.ones((STRIDE, STRIDE))) for m in cell_maps])
    mean = np.full((STRIDE, STRIDE), 1.0 / STRIDE**2)       # a power of two: exact
    net.params["cvg/classifier"][0].data[...] = 0
    net.params["cvg/classifier"][0].data[0, 0] = mean
    net.params["bbox/regressor"][0].data[...] = 0
    for k in range(4):
        net.params["bbox/regressor"][0].data[k, k + 1] = mean
    for name in ("cvg/classifier", "bbox/regressor"):
        net.params[name][1].data[...] = 0
    out = net.forward(data=image[None].astype(np.float32))
    assert net.blobs["coverage"].data == pytest.approx(coverage, abs=1e-5)
    assert out["bbox-list"].shape == (1, 50, 5)
    assert rows_of(out["bbox-list"][0]) == approx(sorted(EXPECTED))


# -- validation: ground-truth lists, scoring and DIGITS' mAP ------------------------------
GT_CELLS = {(1, 1): (1.0, (20.0, 18.0, 60.0, 50.0)), (1, 2): (1.0, (20.0, 18.0, 60.0, 50.0)),
            (2, 6): (1.0, (100.5, 30.0, 124.0, 62.25)), (0, 0): (1.0, (2.0, 2.0, 12.0, 14.0))}
GT_ROWS = [[2, 2, 12, 14, 0], [20, 18, 60, 50, 0], [100.5, 30, 124, 62.25, 0]]


def validation_net(tmp_path):
    shapes = {"coverage": (2, 1, GRID_H, GRID_W), "bboxes": (2, 4, GRID_H, GRID_W),
              "coverage-label": (2, 1, GRID_H, GRID_W), "bbox-label": (2, 4, GRID_H, GRID_W)}
    text = (input_layer(shapes)
            + python_layer("cluster", "clustering", "ClusterDetections",
                           ("coverage", "bboxes"), ("bbox-list",), DEPLOY_PARAMS + ", 1")
            + python_layer("cluster_gt", "clustering", "ClusterGroundtruth",
                           ("coverage-label", "bbox-label"), ("bbox-list-label",), "128, 64, 16, 1")
            + python_layer("score", "mean_ap", "ScoreDetections",
                           ("bbox-list-label", "bbox-list"), ("bbox-list-scored",))
            + python_layer("score_strict", "mean_ap", "ScoreDetections",
                           ("bbox-list-label", "bbox-list"), ("scored-strict",), "0.9")
            + python_layer("mAP", "mean_ap", "mAP", ("bbox-list-scored",),
                           ("mAP", "precision", "recall"), "128, 64, 16")
            + python_layer("mAP_strict", "mean_ap", "mAP", ("scored-strict",),
                           ("mAP-strict", "precision-strict", "recall-strict")))
    return caffe.Net(write(tmp_path, text), caffe.TEST)


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def test_validation_chain_lists_truth_marks_detections_and_scores(tmp_path):
    net = validation_net(tmp_path)
    coverage, bboxes = maps(CELLS)
    cov_label, bbox_label = maps(GT_CELLS)
    out = run(net, coverage=coverage, bboxes=bboxes, **{"coverage-label": cov_label,
                                                         "bbox-label": bbox_label})
    truth = net.blobs["bbox-list-label"].data
    assert truth.shape == (2, 50, 5) and truth[0, :3].tolist() == GT_ROWS  # distinct, sorted
    assert not truth[0, 3:].any() and not truth[1].any()
    b_iou = iou(EXPECTED[1], GT_ROWS[2])                     # 660 / 757.875
    assert b_iou == pytest.approx(660 / 757.875) and 0.7 < b_iou < 0.9
    scored = net.blobs["bbox-list-scored"].data
    assert scored.shape == (2, 100, 5)                       # room for every detection and truth
    assert rows_of(scored[0]) == approx(sorted(
        [EXPECTED[0][:4] + [1], EXPECTED[1][:4] + [1], GT_ROWS[0][:4] + [3]]))
    strict = net.blobs["scored-strict"].data[0]
    assert rows_of(strict) == approx(sorted(
        [EXPECTED[0][:4] + [1], EXPECTED[1][:4] + [2], GT_ROWS[0][:4] + [3],
         GT_ROWS[2][:4] + [3]]))
    for marks in (scored[0, :3, 4], strict[:4, 4]):          # TPs, then FPs, then misses
        assert np.all(np.diff(marks) >= 0)
    assert not scored[0, 3:].any() and not strict[4:].any() and not scored[1].any()
    # IoU 0.7: TP 2, FP 0, missed 1; IoU 0.9: TP 1, FP 1, missed 2 (percent)
    assert out["precision"] == pytest.approx([100.0]) and out["recall"] == pytest.approx([200 / 3])
    assert out["mAP"] == pytest.approx([200 / 3])
    assert out["precision-strict"] == pytest.approx([50.0])
    assert out["recall-strict"] == pytest.approx([100 / 3])
    assert out["mAP-strict"] == pytest.approx([50.0 * 100 / 3 / 100])


def test_nothing_detected_scores_zero_not_nan(tmp_path):
    net = validation_net(tmp_path)
    zeros = np.zeros((2, 1, GRID_H, GRID_W), np.float32)
    out = run(net, coverage=zeros, **{"coverage-label": zeros})
    assert [out[k].tolist() for k in ("mAP", "precision", "recall")] == [[0.0]] * 3


# -- bad input: one line naming the layer ---------------------------------------------------
@pytest.mark.parametrize("param_str, message", [
    ("128, 64", r"ClusterDetections layer 'cluster': param_str '128, 64' needs 7 to 9"),
    ("128, 64, 16, 0.6, 1.5, 0.2, 10", r"group_threshold is '1.5', not an integer"),
    ("128, 64, 0, 0.6, 1, 0.2, 10", r"stride > 0"),
    (DEPLOY_PARAMS + ", 2", r"has 1 tops for num_classes=2"),
])
def test_bad_param_str_names_the_layer(tmp_path, param_str, message):
    with pytest.raises(ValueError, match=message):
        deploy_net(tmp_path, param_str)


def test_bbox_map_of_the_wrong_shape_names_the_layer(tmp_path):
    text = (input_layer({"coverage": (1, 1, 4, 8), "bboxes": (1, 2, 4, 8)})
            + python_layer("cluster", "clustering", "ClusterDetections",
                           ("coverage", "bboxes"), ("bbox-list",), DEPLOY_PARAMS))
    with pytest.raises(ValueError, match=r"'cluster': bboxes shape \[1, 2, 4, 8\] should be"):
        caffe.Net(write(tmp_path, text), caffe.TEST)


def test_score_threshold_that_is_not_a_number_names_the_layer(tmp_path):
    text = (input_layer({"gt": (1, 50, 5), "det": (1, 50, 5)})
            + python_layer("score", "mean_ap", "ScoreDetections", ("gt", "det"), ("scored",),
                           "640, 640, 16"))
    with pytest.raises(ValueError, match=r"ScoreDetections layer 'score': param_str '640, 640"):
        caffe.Net(write(tmp_path, text), caffe.TEST)


def test_nan_regressions_of_a_diverged_net_propose_nothing(tmp_path):
    coverage, bboxes = maps(CELLS)
    bboxes[0, :, 1, :] = np.nan                              # object A's row of cells
    out = run(deploy_net(tmp_path), coverage=coverage, bboxes=bboxes)["bbox-list"]
    assert rows_of(out[0]) == approx([EXPECTED[1]])


# -- the namespace: caffe.layers is NetSpec's factory and a package -------------------------
def _netspec_proto(L):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=4)
    return str(n.to_proto())


def test_caffe_layers_serves_netspec_and_the_detectnet_modules():
    from caffe import layers as L
    before = _netspec_proto(L)
    import caffe.layers.detectnet.clustering as clustering
    import caffe.layers.detectnet.mean_ap as mean_ap
    from caffe import layers as L_after
    assert L_after is L is caffe.layers and caffe.model_libs.L is L
    assert _netspec_proto(L_after) == before and 'type: "Convolution"' in before
    assert clustering is caffe_compat.detectnet.clustering and L.detectnet.clustering is clustering
    assert mean_ap is sys.modules["caffe_compat.detectnet.mean_ap"]
    assert issubclass(clustering.ClusterDetections, caffe.Layer)
    with pytest.raises(AttributeError):
        L.__all__                                            # no star-import surprises


def test_fresh_interpreter_imports_the_layer_path_first():
    code = ("import caffe.layers.detectnet.clustering as c, caffe\n"
            "from caffe import layers as L\n"
            "n = caffe.NetSpec(); n.data = L.Input(shape=dict(dim=[1, 1, 2, 2]))\n"
            "assert L is caffe.layers and c.ClusterDetections.__name__ == 'ClusterDetections'\n"
            "print(str(n.to_proto()).count('Input'))\n")
    root = Path(caffe.__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]
