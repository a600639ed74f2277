"""SSD's training pieces together: convert_annoset writes VOC-style records, AnnotatedData reads
them with the fork's augmentation, and MultiBoxLoss (matching the label rows the data layer
lays out) trains a tiny SSD whose deploy twin's DetectionOutput then finds the boxes, and whose
test phase (DetectionOutput into DetectionEvaluate, eval_type "detection") scores its mAP."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from caffe_compat.data.annoset import AnnosetOptions, convert_annoset
from multibox_reference import iou, tiny_ssd_nets

SIDE = 32
# One square per image (pixels, exclusive end), placed where the tiny net's priors can match
BOXES = [(4, 4, 20, 20), (12, 12, 28, 28), (4, 12, 20, 28), (12, 4, 28, 20)]


def _voc(root: Path) -> Path:
    (root / "img").mkdir()
    (root / "xml").mkdir()
    lines = []
    for i, (x0, y0, x1, y1) in enumerate(BOXES):
        img = np.full((SIDE, SIDE, 3), 30, np.uint8)
        img[y0:y1, x0:x1] = 230
        cv2.imwrite(str(root / "img" / f"{i}.png"), img)
        (root / "xml" / f"{i}.xml").write_text(
            f"<annotation><size><width>{SIDE}</width><height>{SIDE}</height><depth>3</depth>"
            f"</size><object><name>box</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            "</annotation>")
        lines.append(f"img/{i}.png xml/{i}.xml")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "labelmap.prototxt").write_text(
        'item { name: "background" label: 0 }\nitem { name: "box" label: 1 }\n')
    options = AnnosetOptions(label_map_file=str(root / "labelmap.prototxt"), check_label=True,
                             encoded=True, encode_type="png")
    report = convert_annoset(f"{root}/", str(root / "list.txt"), str(root / "lmdb"), options)
    assert report.written == len(BOXES)
    return root / "lmdb"


def _train_net(lmdb: Path) -> str:
    """tiny_ssd_nets' train net with its Input data/label replaced by AnnotatedData."""
    train, _ = tiny_ssd_nets()
    data = ('layer { name: "data" type: "AnnotatedData" top: "data" top: "label" '
            'include { phase: TRAIN } transform_param { mirror: true scale: 0.00390625 '
            'resize_param { height: 16 width: 16 resize_mode: WARP interp_mode: LINEAR } } '
            f'data_param {{ source: "{lmdb}" batch_size: 4 backend: LMDB }} '
            'annotated_data_param { anno_type: BBOX } }\n')
    kept = [line for line in train.splitlines(keepends=True)
            if 'type: "Input"' not in line]
    return data + "".join(kept)


def test_annotated_data_feeds_multibox_loss_and_a_tiny_ssd_learns(tmp_path, monkeypatch):
    import caffe_compat as caffe
    monkeypatch.setenv("GLOG_minloglevel", "1")
    lmdb = _voc(tmp_path)
    (tmp_path / "train.prototxt").write_text(_train_net(lmdb))
    (tmp_path / "deploy.prototxt").write_text(tiny_ssd_nets()[1])
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "train.prototxt"}"\nbase_lr: 0.05\nlr_policy: "fixed"\n'
        'momentum: 0.9\nmax_iter: 150\ndisplay: 0\nsnapshot_after_train: false\n'
        'random_seed: 3\nsolver_mode: CPU\n')
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    solver.step(1)
    label = solver.net.blobs["label"].data
    assert label.shape == (1, 1, len(BOXES), 8)          # one row per box, the fork's layout
    assert sorted(label[0, 0, :, 0]) == list(range(len(BOXES)))
    first = float(solver.net.blobs["mbox_loss"].data)
    solver.step(149)
    assert float(solver.net.blobs["mbox_loss"].data) < 0.3 * first
    solver.net.save(str(tmp_path / "trained.caffemodel"))
    net = caffe.Net(str(tmp_path / "deploy.prototxt"), str(tmp_path / "trained.caffemodel"),
                    caffe.TEST)
    for i, (x0, y0, x1, y1) in enumerate(BOXES):
        img = cv2.imread(str(tmp_path / "img" / f"{i}.png"))
        small = cv2.resize(img, (16, 16), interpolation=cv2.INTER_LINEAR)
        net.blobs["data"].data[...] = small.transpose(2, 0, 1)[None] / 256.0
        best = net.forward()["detection_out"][0, 0, 0]     # [image, label, score, box]
        assert best[1] == 1 and best[2] > 0.5, (i, best)
        assert iou(best[3:], np.array([x0, y0, x1, y1]) / SIDE) > 0.6, (i, best)


def _test_net(lmdb: Path) -> str:
    """The deploy net on AnnotatedData's TEST batches, DetectionOutput scored by
    DetectionEvaluate, as ssd_pascal.py's test net is built."""
    data = ('layer { name: "data" type: "AnnotatedData" top: "data" top: "label" '
            'transform_param { scale: 0.00390625 resize_param { height: 16 width: 16 '
            'resize_mode: WARP interp_mode: LINEAR } } '
            f'data_param {{ source: "{lmdb}" batch_size: 4 backend: LMDB }} '
            'annotated_data_param { anno_type: BBOX } }\n')
    evaluate = ('layer { name: "detection_eval" type: "DetectionEvaluate" bottom: "detection_out" '
                'bottom: "label" top: "detection_eval" detection_evaluate_param { '
                'num_classes: 2 background_label_id: 0 overlap_threshold: 0.5 } }\n')
    kept = [line for line in tiny_ssd_nets()[1].splitlines(keepends=True)
            if 'type: "Input"' not in line]
    return data + "".join(kept) + evaluate


def test_the_tiny_ssd_test_phase_scores_its_map(tmp_path, monkeypatch):
    import caffe_compat as caffe
    from caffe_compat.engine.solver import events
    monkeypatch.setenv("GLOG_minloglevel", "1")
    lmdb = _voc(tmp_path)
    (tmp_path / "train.prototxt").write_text(_train_net(lmdb))
    (tmp_path / "test.prototxt").write_text(_test_net(lmdb))
    (tmp_path / "solver.prototxt").write_text(
        f'train_net: "{tmp_path / "train.prototxt"}"\ntest_net: "{tmp_path / "test.prototxt"}"\n'
        'test_iter: 1\ntest_interval: 150\ntest_initialization: false\neval_type: "detection"\n'
        'ap_version: "11point"\nbase_lr: 0.05\nlr_policy: "fixed"\nmomentum: 0.9\n'
        'max_iter: 150\ndisplay: 0\nsnapshot_after_train: false\nrandom_seed: 3\n')
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    tests = []
    solver.subscribe(tests.append, events.TestDone)
    solver.solve()
    assert [t.iter for t in tests] == [150]
    rows = solver.test_nets[0].blobs["detection_eval"].data[0, 0]
    assert rows[0].tolist() == [-1, 1, len(BOXES), -1, -1]    # the class's count row
    assert tests[0].scalar("detection_eval") > 0.9, rows
