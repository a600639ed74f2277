"""SSD's AnnotatedData layer and convert_annoset on a small VOC-style set made here: images
drawn with OpenCV, their boxes written as VOC XML, converted, read back and augmented."""
from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from caffe_compat.data import bbox
from caffe_compat.data.annoset import AnnosetOptions, convert_annoset
from caffe_compat.data.annotated_transform import AnnotatedTransformer
from caffe_compat.data.bbox import Boxes
from caffe_compat.engine.layers import TEST, TRAIN
from caffe_compat.formats.errors import CaffeCompatError, DataError
from caffe_compat.proto import caffe_pb2
from google.protobuf import text_format
from layer_utils import make_layer
from test_data_layers import seeded  # noqa: F401  (the fixture: random_seed 1234)

f32 = np.float32
H, W = 60, 80
LABELMAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "cat" label: 1 display_name: "cat" }
item { name: "dog" label: 2 display_name: "dog" }
"""
# Per image: (name, xmin, ymin, xmax, ymax, difficult), in pixels.
OBJECTS = [[("cat", 10, 12, 40, 50, 0), ("dog", 50, 5, 75, 30, 1), ("cat", 2, 40, 20, 58, 0)],
           [("dog", 20, 20, 60, 45, 0)],
           [("cat", 30, 10, 70, 55, 0)]]


def _image(i: int) -> np.ndarray:
    img = np.full((H, W, 3), (40 + 60 * i, 90, 200 - 50 * i), dtype=np.uint8)
    img[:, :, 1] += np.arange(W, dtype=np.uint8)[None, :]   # a ramp: any flip or shift shows
    for k, (_, x0, y0, x1, y1, _) in enumerate(OBJECTS[i]):
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (255 - 80 * k, 30 * k, 10), -1)
    return img


def _xml(objects) -> str:
    body = "".join(f"<object><name>{n}</name><pose>Left</pose><difficult>{d}</difficult>"
                   f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                   f"<ymax>{y1}</ymax></bndbox></object>" for n, x0, y0, x1, y1, d in objects)
    return (f"<annotation><filename>x.png</filename><size><width>{W}</width><height>{H}"
            f"</height><depth>3</depth></size>{body}</annotation>")


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    (root / "JPEGImages").mkdir()
    (root / "Annotations").mkdir()
    lines = []
    for i in range(len(OBJECTS)):
        cv2.imwrite(str(root / "JPEGImages" / f"{i}.png"), _image(i))
        (root / "Annotations" / f"{i}.xml").write_text(_xml(OBJECTS[i]))
        lines.append(f"JPEGImages/{i}.png Annotations/{i}.xml")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "labelmap.prototxt").write_text(LABELMAP)
    for name, encoded in (("raw_lmdb", False), ("jpg_lmdb", True)):
        options = AnnosetOptions(label_map_file=str(root / "labelmap.prototxt"),
                                 check_label=True, encoded=encoded,
                                 encode_type="jpg" if encoded else "")
        report = convert_annoset(f"{root}/", str(root / "list.txt"), str(root / name), options)
        assert report.written == 3 and not report.skipped
    return root


def _layer(voc: Path, transform: str = "", samplers: str = "", phase=TEST, n=3, db="raw_lmdb"):
    text = f"""name: "data" type: "AnnotatedData" top: "data" top: "label"
        transform_param {{ {transform} }}
        data_param {{ source: "{voc / db}" batch_size: {n} backend: LMDB }}
        annotated_data_param {{ {samplers} label_map_file: "{voc / 'labelmap.prototxt'}" }}"""
    return make_layer(text, [], phase)


def _batch(voc, **kw):
    layer = _layer(voc, **kw)
    try:
        data, label = layer()
        return layer, data.numpy(), label.numpy()
    finally:
        layer.close()


def _expected_rows() -> np.ndarray:
    """The label rows the XML boxes give: grouped by label in order of appearance."""
    rows = []
    for item, objects in enumerate(OBJECTS):
        labels = {"cat": 1, "dog": 2}
        order = list(dict.fromkeys(n for n, *_ in objects))
        for name in order:
            same = [o for o in objects if o[0] == name]
            for inst, (_, x0, y0, x1, y1, d) in enumerate(same):
                rows.append([item, labels[name], inst, f32(x0) / f32(W), f32(y0) / f32(H),
                             f32(x1) / f32(W), f32(y1) / f32(H), d])
    return np.array(rows, dtype=f32)


def test_test_phase_gives_the_images_and_the_xml_boxes_normalised(voc):
    layer, data, label = _batch(voc)
    assert data.shape == (3, 3, H, W) and label.shape == (1, 1, 5, 8)
    assert layer.top_shapes([]) == [(3, 3, H, W), (1, 1, 3, 8)]   # from the first record
    for i in range(3):
        np.testing.assert_array_equal(data[i], _image(i).transpose(2, 0, 1).astype(f32))
    np.testing.assert_array_equal(label[0, 0], _expected_rows())


def test_mirror_flips_the_pixels_and_swaps_xmin_xmax(voc, seeded):
    _, data, label = _batch(voc, transform="mirror: true", phase=TRAIN)
    rows, expected = label[0, 0], _expected_rows()
    flipped = set()
    for i in range(3):
        plain = _image(i).transpose(2, 0, 1).astype(f32)
        if np.array_equal(data[i], plain[:, :, ::-1]):
            flipped.add(i)
        else:
            np.testing.assert_array_equal(data[i], plain)
    assert 0 < len(flipped) < 3, "seed 1234 should flip some images and not others"
    for row, exp in zip(rows, expected):
        if int(row[0]) in flipped:
            exp = exp.copy()
            exp[3], exp[5] = f32(1) - exp[5], f32(1) - exp[3]
        np.testing.assert_array_equal(row, exp)


def test_resize_warps_to_300_and_keeps_the_normalised_boxes(voc):
    _, data, label = _batch(voc, transform="resize_param { height: 300 width: 300 "
                                           "resize_mode: WARP }")
    assert data.shape == (3, 3, 300, 300)
    warped = cv2.resize(_image(1), (300, 300), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(data[1], warped.transpose(2, 0, 1).astype(f32))
    np.testing.assert_allclose(label[0, 0], _expected_rows(), atol=1e-6)


def test_mean_values_and_scale(voc):
    _, data, _ = _batch(voc, transform="mean_value: 104 mean_value: 117 mean_value: 123 "
                                       "scale: 0.5")
    expected = (_image(0).transpose(2, 0, 1) - np.array([104, 117, 123]).reshape(3, 1, 1)) * 0.5
    np.testing.assert_array_equal(data[0], expected.astype(f32))


SAMPLER = """batch_sampler { sampler { min_scale: 0.3 max_scale: 1.0 min_aspect_ratio: 0.5
  max_aspect_ratio: 2.0 } sample_constraint { min_jaccard_overlap: 0.5 } max_trials: 50
  max_sample: 1 }"""


def _param(text: str, message):
    return text_format.Parse(text, message)


def _iou64(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_sampled_crops_satisfy_min_jaccard_overlap():
    sampler = _param(SAMPLER, caffe_pb2.AnnotatedDataParameter()).batch_sampler
    objects = _expected_rows()[:3, 3:7]
    kept = 0
    for seed in range(40):
        for crop in bbox.generate_crops(objects, sampler, np.random.default_rng(seed)):
            kept += 1
            assert max(_iou64(crop.astype(float), o.astype(float)) for o in objects) >= 0.5 - 1e-6
    assert kept > 10


def _transformer(transform: str, samplers: str = "", phase=TRAIN):
    tp = _param(transform, caffe_pb2.TransformationParameter())
    ap = _param(samplers, caffe_pb2.AnnotatedDataParameter())
    return AnnotatedTransformer(tp, ap.batch_sampler, phase, 3, "test")


def _boxes(i: int = 0) -> Boxes:
    rows = _expected_rows()
    rows = rows[rows[:, 0] == i]
    return Boxes(rows[:, 1].astype(int), rows[:, 2].astype(int), rows[:, 3:7].copy(),
                 rows[:, 7] > 0)


def test_a_sampled_crop_re_expresses_the_boxes_in_its_frame():
    t = _transformer("resize_param { height: 32 width: 32 }", SAMPLER)
    data, boxes = t.item(_image(0), _boxes(0), False, np.random.default_rng(7))
    # The same draws again, by hand: the accepted crops, then the pick.
    r = np.random.default_rng(7)
    crops = bbox.generate_crops(_boxes(0).xyxy, t.samplers, r)
    window = crops[int(r.integers(len(crops)))].astype(float)
    x, y = int(f32(window[0]) * f32(W)), int(f32(window[1]) * f32(H))
    w = int(f32(window[2]) * f32(W) - f32(window[0]) * f32(W))
    h = int(f32(window[3]) * f32(H) - f32(window[1]) * f32(H))
    cut = cv2.resize(_image(0)[y:y + h, x:x + w], (32, 32), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(data, cut.transpose(2, 0, 1).astype(f32))
    size = np.array([window[2] - window[0], window[3] - window[1]] * 2)
    expected = [np.clip((b - window[[0, 1, 0, 1]]) / size, 0, 1) for b in _boxes(0).xyxy
                if b[0] < window[2] and b[2] > window[0] and b[1] < window[3] and b[3] > window[1]]
    np.testing.assert_allclose(boxes.xyxy, np.array(expected).reshape(-1, 4), atol=1e-5)


def test_expand_puts_the_image_on_a_canvas_and_shifts_the_boxes():
    t = _transformer("expand_param { prob: 1 max_expand_ratio: 2 }")
    data, boxes = t.item(_image(0), _boxes(0), False, np.random.default_rng(3))
    r = np.random.default_rng(3)
    r.uniform(0, 1)                                    # the expand-or-not draw
    ratio = f32(r.uniform(1, 2))
    big_h, big_w = int(f32(H) * ratio), int(f32(W) * ratio)
    y, x = int(np.floor(f32(r.uniform(0, big_h - H)))), int(np.floor(f32(r.uniform(0, big_w - W))))
    assert data.shape == (3, big_h, big_w)
    np.testing.assert_array_equal(data[:, y:y + H, x:x + W], _image(0).transpose(2, 0, 1))
    outside = np.ones((big_h, big_w), bool)
    outside[y:y + H, x:x + W] = False
    assert (data[:, outside] == 32).all()              # the fork's raw-record canvas byte
    pixels = _boxes(0).xyxy * np.array([W, H, W, H]) + np.array([x, y, x, y])
    np.testing.assert_allclose(boxes.xyxy, pixels / np.array([big_w, big_h, big_w, big_h]),
                               atol=1e-6)


def test_encoded_expand_fills_the_canvas_with_the_mean_values():
    t = _transformer("expand_param { prob: 1 max_expand_ratio: 3 } mean_value: 0 "
                     "mean_value: 0 mean_value: 0")
    dark = np.zeros((H, W, 3), np.uint8)
    data, _ = t.item(dark, _boxes(0), True, np.random.default_rng(0))
    assert data.shape[1] > H and np.abs(data).max() <= 2      # JPEG-stored, as the fork's


def test_emit_constraint_center_drops_boxes_whose_centre_leaves_the_crop():
    boxes = Boxes(np.array([1, 2]), np.array([0, 0]),
                  np.array([[0.1, 0.1, 0.4, 0.4], [0.3, 0.3, 0.9, 0.9]], f32), np.zeros(2, bool))
    window = np.array([0.0, 0.0, 0.5, 0.5], f32)
    kept = _transformer("emit_constraint { emit_type: CENTER }").annotate(boxes, window)
    np.testing.assert_allclose(kept.xyxy, [[0.2, 0.2, 0.8, 0.8]], atol=1e-6)
    assert list(kept.label) == [1]
    both = _transformer("").annotate(boxes, window)      # no constraint: clipped, kept
    np.testing.assert_allclose(both.xyxy, [[0.2, 0.2, 0.8, 0.8], [0.6, 0.6, 1.0, 1.0]],
                               atol=1e-6)


def test_a_batch_without_boxes_gives_one_row_of_minus_ones(voc, tmp_path):
    (tmp_path / "list.txt").write_text("JPEGImages/1.png Annotations/missing.xml\n")
    options = AnnosetOptions(label_map_file=str(voc / "labelmap.prototxt"))
    report = convert_annoset(f"{voc}/", str(tmp_path / "list.txt"), str(tmp_path / "db"), options)
    assert report.written == 1 and "missing.xml" in report.skipped[0]
    layer = make_layer(f"""name: "d" type: "AnnotatedData" top: "data" top: "label"
        data_param {{ source: "{tmp_path / 'db'}" batch_size: 2 backend: LMDB }}""", [], TEST)
    try:
        _, label = layer()
    finally:
        layer.close()
    np.testing.assert_array_equal(label.numpy(), -np.ones((1, 1, 1, 8), f32))


def test_train_batches_repeat_with_the_seed(voc, seeded):
    transform = ("mirror: true resize_param { height: 40 width: 40 } emit_constraint { "
                 "emit_type: CENTER } expand_param { prob: 0.5 max_expand_ratio: 2 } "
                 "distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 "
                 "contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 "
                 "saturation_prob: 0.5 saturation_lower: 0.5 saturation_upper: 1.5 "
                 "random_order_prob: 0.5 }")
    first = _batch(voc, transform=transform, samplers=SAMPLER, phase=TRAIN, db="jpg_lmdb")
    second = _batch(voc, transform=transform, samplers=SAMPLER, phase=TRAIN, db="jpg_lmdb")
    for a, b in zip(first[1:], second[1:]):
        np.testing.assert_array_equal(a, b)
    rows = first[2][0, 0]
    assert first[1].shape == (3, 3, 40, 40) and rows.shape[1] == 8
    assert ((rows[:, 3:7] >= 0) & (rows[:, 3:7] <= 1)).all()


def test_convert_annoset_names_the_file_of_a_bad_annotation(voc, tmp_path):
    options = AnnosetOptions(label_map_file=str(voc / "labelmap.prototxt"))
    (tmp_path / "bird.xml").write_text(_xml([("bird", 1, 1, 5, 5, 0)]))
    (tmp_path / "bad.xml").write_text("<annotation><object>\n<name>cat</name>")
    for anno, message in (("bird.xml", r"list.txt:1: .*bird.xml: object 1: unknown label "
                                       r"name 'bird'"),
                          ("bad.xml", r"list.txt:1: .*bad.xml:2:\d+: not valid XML")):
        (tmp_path / "list.txt").write_text(f"{voc}/JPEGImages/0.png {tmp_path}/{anno}\n")
        with pytest.raises(DataError, match=message):
            convert_annoset("", str(tmp_path / "list.txt"), str(tmp_path / "db"), options)
        assert not (tmp_path / "db").exists()


def test_convert_annoset_reads_txt_annotations(voc, tmp_path):
    (tmp_path / "a.txt").write_text("2 8 6 40 30\n2 0 0 16 12\n")
    (tmp_path / "list.txt").write_text(f"{voc}/JPEGImages/0.png {tmp_path}/a.txt\n")
    convert_annoset("", str(tmp_path / "list.txt"), str(tmp_path / "db"),
                    AnnosetOptions(label_type="txt"))
    _, _, label = _batch(tmp_path, n=1, db="db")
    np.testing.assert_allclose(label[0, 0], [[0, 2, 0, 0.1, 0.1, 0.5, 0.5, 0],
                                             [0, 2, 1, 0.0, 0.0, 0.2, 0.2, 0]], atol=1e-7)


def test_refused_options_name_the_layer_and_option(voc):
    with pytest.raises(CaffeCompatError, match=r"layer 'data'.*convert_to_lab"):
        _layer(voc, transform="noise_param { convert_to_lab: true }")
    with pytest.raises(CaffeCompatError, match=r"layer 'data'.*FIT_SMALL_SIZE.*batch_size 1"):
        _layer(voc, transform="resize_param { height: 30 width: 30 resize_mode: FIT_SMALL_SIZE }")


def test_a_net_with_annotated_data_trains(voc, tmp_path, seeded):
    import caffe_compat as caffe
    net = tmp_path / "train.prototxt"
    net.write_text(textwrap.dedent(f"""\
        layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label"
          transform_param {{ mirror: true mean_value: 104 mean_value: 117 mean_value: 123
            resize_param {{ height: 32 width: 32 interp_mode: LINEAR interp_mode: AREA }}
            emit_constraint {{ emit_type: CENTER }}
            expand_param {{ prob: 0.5 max_expand_ratio: 2 }} }}
          data_param {{ source: "{voc / 'jpg_lmdb'}" batch_size: 2 backend: LMDB }}
          annotated_data_param {{ {SAMPLER} }} }}
        layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
          convolution_param {{ num_output: 2 kernel_size: 3
            weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
        layer {{ name: "loss" type: "Reduction" bottom: "conv" top: "loss" loss_weight: 1
          reduction_param {{ operation: SUMSQ coeff: 0.001 }} }}
        layer {{ name: "silence" type: "Silence" bottom: "label" }}
        """))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 2\n'
                      f'solver_mode: CPU\nrandom_seed: 5\nsnapshot_after_train: false\n')
    s = caffe.SGDSolver(str(solver))
    s.step(2)
    assert np.isfinite(s.net.blobs["loss"].data).all()
    label = s.net.blobs["label"].data
    assert label.shape[:2] == (1, 1) and label.shape[3] == 8


def test_brightness_and_contrast_are_opencv_convert_to():
    from caffe_compat.data.im_transforms import distort
    p = _param("brightness_prob: 1 brightness_delta: 32 contrast_prob: 1 contrast_lower: 0.5 "
               "contrast_upper: 1.5", caffe_pb2.DistortionParameter())
    out = distort(_image(0), p, np.random.default_rng(11))
    r = np.random.default_rng(11)
    order = f32(r.uniform(0, 1))
    r.uniform(0, 1)
    delta = f32(r.uniform(-32, 32))
    img = np.clip(np.rint(_image(0).astype(f32) + delta), 0, 255)
    r.uniform(0, 1)
    if order <= 0.5:      # contrast after saturation and hue, which draw their coin first
        r.uniform(0, 1), r.uniform(0, 1)
    alpha = f32(r.uniform(0.5, 1.5))
    np.testing.assert_array_equal(out, np.clip(np.rint(img.astype(f32) * alpha), 0, 255))


def test_convert_annoset_command_takes_both_flag_spellings(voc, tmp_path, capsys):
    from caffe_compat.commands.convert_annoset import main
    labelmap = voc / "labelmap.prototxt"
    assert main(["--anno-type", "detection", f"--label-map-file={labelmap}", "--check-label",
                 "--encoded", "--encode-type", "jpg", f"{voc}/", str(voc / "list.txt"),
                 str(tmp_path / "a")]) == 0
    assert main([f"--label_map_file={labelmap}", "--check_label=true", "--resize_height=30",
                 "--resize_width=40", f"{voc}/", str(voc / "list.txt"),
                 str(tmp_path / "b")]) == 0
    assert "wrote" in capsys.readouterr().out
    _, data, label = _batch(tmp_path, db="b")
    assert data.shape == (3, 3, 30, 40)
    np.testing.assert_allclose(label[0, 0], _expected_rows(), atol=1e-7)  # still normalised
    (tmp_path / "list2.txt").write_text("JPEGImages/0.png Annotations/0.xml\n")
    (tmp_path / "map.prototxt").write_text('item { name: "dog" label: 1 }')
    capsys.readouterr()
    assert main([f"--label-map-file={tmp_path / 'map.prototxt'}", f"{voc}/",
                 str(tmp_path / "list2.txt"), str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "list2.txt:1" in err and "unknown label name 'cat'" in err


def test_classification_records_give_the_datum_labels(voc, tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"JPEGImages/{i}.png {i + 4}\n" for i in range(3)))
    convert_annoset(f"{voc}/", str(tmp_path / "list.txt"), str(tmp_path / "db"),
                    AnnosetOptions(anno_type="classification"))
    _, data, label = _batch(tmp_path, db="db")
    assert data.shape == (3, 3, H, W)
    np.testing.assert_array_equal(label, np.array([4, 5, 6], f32).reshape(3, 1, 1, 1))


def test_encoded_records_carry_their_shape_and_the_boxes(voc):
    from caffe_compat.data.db import open_db
    with open_db(str(voc / "jpg_lmdb")) as db:
        key, value = db.first()
    record = caffe_pb2.AnnotatedDatum.FromString(value)
    assert key == b"00000000_JPEGImages/0.png" and record.type == record.BBOX
    d = record.datum
    assert d.encoded and (d.channels, d.height, d.width) == (3, H, W) and d.label == -1
    assert [(g.group_label, len(g.annotation)) for g in record.annotation_group] == [(1, 2), (2, 1)]
    assert [a.instance_id for a in record.annotation_group[0].annotation] == [0, 1]


def test_test_phase_applies_the_augmentation_its_prototxt_sets(voc, seeded):
    """The fork has no phase check in its augmentation: a TEST net that sets expand_param
    expands (SSD's own TEST nets set none)."""
    _, data, label = _batch(voc, transform="resize_param { height: 40 width: 40 } "
                                           "expand_param { prob: 1 max_expand_ratio: 3 }")
    assert data.shape == (3, 3, 40, 40)
    widths = label[0, 0, :, 5] - label[0, 0, :, 3]
    assert (widths < _expected_rows()[:, 5] - _expected_rows()[:, 3] - 1e-6).all()


def test_fit_large_size_and_pad_letterboxes_image_and_boxes():
    t = _transformer("resize_param { height: 300 width: 300 resize_mode: FIT_LARGE_SIZE_AND_PAD "
                     "pad_value: 7 }", phase=TEST)
    data, boxes = t.item(_image(0), _boxes(0), False, np.random.default_rng(0))
    assert data.shape == (3, 300, 300)
    assert (data[:, :37] == 7).all() and (data[:, 37 + 225:] == 7).all()   # 80×60 → 300×225
    np.testing.assert_array_equal(data[:, 37:262], cv2.resize(_image(0), (300, 225)).transpose(
        2, 0, 1))
    pixels = _boxes(0).xyxy * np.array([W, H, W, H])
    expected = (pixels * np.array([300 / W, 225 / H, 300 / W, 225 / H]) + [0, 37.5, 0, 37.5]) / 300
    np.testing.assert_allclose(boxes.xyxy, expected, atol=1e-6)   # the fork's unrounded pad


@pytest.mark.parametrize("option", ["decolorize", "gauss_blur", "hist_eq", "clahe", "jpeg: 50",
                                    "erode", "posterize", "inverse", "convert_to_hsv",
                                    "saltpepper: true saltpepper_param { fraction: 0.1 value: 0 }"])
def test_each_noise_option_keeps_an_8_bit_image(option):
    from caffe_compat.data.im_transforms import noise
    text = option if ":" in option else f"{option}: true"
    out = noise(_image(0), _param(text, caffe_pb2.NoiseParameter()), np.random.default_rng(0))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, _image(0))
