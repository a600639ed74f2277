"""NVIDIA/caffe's DetectNet training layers: L1Loss and DetectNetTransformation.

The ground-truth grid is checked against a float64 re-statement of the fork's CPU code
(util/detectnet_coverage_rectangular.cpp, layers/detectnet_transform_layer.cpp) written
cell by cell over the whole grid, and against values worked out by hand.
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pytest
import torch

import caffe
from caffe_compat.engine.layers.base import TEST, TRAIN, LayerError
from caffe_compat.formats.blob_io import write_blobproto
from tests.layer_utils import make_layer

EPS32 = float(np.finfo(np.float32).eps)


# -- L1Loss -------------------------------------------------------------------------------
def test_l1_loss_value_and_gradients_by_finite_differences():
    layer = make_layer('name: "l" type: "L1Loss"', [(2, 3, 2, 2), (2, 12)])
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(2, 3, 2, 2)), requires_grad=True)
    b = torch.tensor(rng.normal(size=(2, 12)), requires_grad=True)
    loss = layer(a, b)
    expected = np.abs(a.detach().numpy().reshape(2, 12) - b.detach().numpy()).sum() / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    (loss * 3).backward()                                  # loss_weight 3 as the top's diff

    def value(x, y):
        return float(layer(torch.tensor(x), torch.tensor(y))) * 3

    for tensor, other, first in ((a, b, True), (b, a, False)):
        x, y = tensor.detach().numpy(), other.detach().numpy()
        numeric = np.zeros(x.size)
        for i in range(x.size):
            step = np.zeros(x.size)
            step[i] = 1e-6
            step = step.reshape(x.shape)
            plus, minus = x + step, x - step
            args = ((plus, y), (minus, y)) if first else ((y, plus), (y, minus))
            numeric[i] = (value(*args[0]) - value(*args[1])) / 2e-6
        np.testing.assert_allclose(tensor.grad.numpy().reshape(-1), numeric, atol=1e-6)


def test_l1_loss_gives_zero_gradient_where_equal_and_checks_sizes():
    layer = make_layer('name: "l" type: "L1Loss"', [(1, 2), (1, 2)])
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    layer(a, torch.tensor([[1.0, 0.0]], dtype=torch.float64)).backward()
    assert a.grad.tolist() == [[0.0, 1.0]]                 # caffe_cpu_sign(0) = 0
    with pytest.raises(LayerError, match="same size per sample"):
        make_layer('name: "l" type: "L1Loss"', [(1, 2), (1, 3)])


# -- the fork's ground truth, restated --------------------------------------------------
def reference_grid(boxes, stride=4, size=(32, 24), scale_cvg=0.5, grid_min=False,
                   min_len=50, max_len=50, obj_norm=False, crop=True, classes=None):
    """boxes: (x, y, w, h, class) rows in order. Returns [8 + C, H/stride, W/stride]."""
    classes = classes or {1: 0}
    gw, gh = size[0] // stride, size[1] // stride
    out = np.zeros((8 + max(classes.values()) + 1, gh, gw))
    for x, y, w, h, cls in boxes:
        if crop:                                          # bbox & imageROI
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + w, size[0]), min(y + h, size[1])
            x, y, w, h = (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else (0, 0, 0, 0)
        if int(cls) not in classes or w * h < EPS32:
            continue
        cw, ch = w * scale_cvg, h * scale_cvg
        if grid_min:
            cw, ch = min(w, max(min_len, cw)), min(h, max(min_len, ch))
        else:
            cw, ch = min(max_len, cw), min(max_len, ch)
        left, top = x + w / 2 - cw / 2, y + h / 2 - ch / 2
        norm = max(0.0 if obj_norm else 1.0, stride * stride / (cw * ch))
        for gy in range(gh):
            for gx in range(gw):
                ox = min(left + cw, (gx + 1) * stride) - max(left, gx * stride)
                oy = min(top + ch, (gy + 1) * stride) - max(top, gy * stride)
                if ox <= 0 or oy <= 0 or ox * oy / stride ** 2 <= EPS32:
                    continue
                out[8:, gy, gx] = 0
                out[8 + classes[int(cls)], gy, gx] = 1
                out[:8, gy, gx] = [1, x - gx * stride, y - gy * stride, x + w - gx * stride,
                                   y + h - gy * stride, 1 / w, 1 / h, norm]
    return out


def label_blob(images, rows=4):
    """DIGITS' label layout: [N, 1, rows + 1, 16], a header row then one row per box."""
    blob = np.zeros((len(images), 1, rows + 1, 16))
    for n, boxes in enumerate(images):
        blob[n, 0, 0, :2] = len(boxes), 16
        for i, (x, y, w, h, cls) in enumerate(boxes):
            blob[n, 0, i + 1, [0, 1, 2, 3, 5]] = x, y, w, h, cls
    return blob


def transform(gt="", aug="", extra="", shape=(1, 3, 24, 32), rows=4, phase=TEST):
    text = (f'name: "t" type: "DetectNetTransformation" detectnet_groundtruth_param {{ '
            f'stride: 4 image_size_x: 32 image_size_y: 24 {gt} }} {extra}')
    if aug:
        text += f" detectnet_augmentation_param {{ {aug} }}"
    return make_layer(text, [shape, (shape[0], 1, rows + 1, 16)], phase)


def run(layer, boxes_per_image, images=None, rows=4):
    n = len(boxes_per_image)
    images = np.zeros((n, 3, 24, 32)) if images is None else images
    img, lab = layer(torch.tensor(images), torch.tensor(label_blob(boxes_per_image, rows)))
    return img.numpy(), lab.numpy()


CASES = {
    "one box": ([(5.0, 3.0, 10.0, 8.0, 1)], {}),
    "two overlapping boxes, later wins": ([(2.0, 2.0, 14.0, 12.0, 1), (8.0, 6.0, 12.0, 10.0, 1)],
                                          {}),
    "out of image, cropped": ([(-6.0, 18.0, 14.0, 12.0, 1), (40.0, 2.0, 5.0, 5.0, 1)], {}),
    "out of image, not cropped": ([(-6.0, 18.0, 14.0, 12.0, 1)], dict(crop=False)),
    "gridbox min, obj_norm, two classes": (
        [(3.0, 1.0, 9.0, 7.0, 2), (14.0, 9.0, 15.0, 11.0, 5), (1.0, 1.0, 4.0, 4.0, 3)],
        dict(grid_min=True, min_len=6, obj_norm=True, classes={2: 0, 5: 1})),
    "gridbox max clamps": ([(1.0, 1.0, 28.0, 20.0, 1)], dict(max_len=6, scale_cvg=0.9)),
}


def _gt_text(grid_min=False, min_len=50, max_len=50, obj_norm=False, crop=True, classes=None,
             scale_cvg=0.5):
    text = (f"scale_cvg: {scale_cvg} min_cvg_len: {min_len} max_cvg_len: {max_len} "
            f"gridbox_type: {'GRIDBOX_MIN' if grid_min else 'GRIDBOX_MAX'} "
            f"obj_norm: {str(obj_norm).lower()} crop_bboxes: {str(crop).lower()}")
    for src, dst in (classes or {}).items():
        text += f" object_class {{ src: {src} dst: {dst} }}"
    return text


@pytest.mark.parametrize("case", sorted(CASES))
def test_ground_truth_grid_matches_the_forks_cpu_code(case):
    boxes, options = CASES[case]
    _, lab = run(transform(_gt_text(**options)), [boxes])
    np.testing.assert_allclose(lab[0], reference_grid(boxes, **options), rtol=1e-12)


def test_one_box_by_hand():
    """Box (5, 3, 10×8): coverage 5×4 centred at (10, 7) = [7.5, 12.5]×[5, 9] -> cells
    x 1..3, y 1..2; norm max(1, 16/20) = 1; cell (1, 1), top-left (4, 4), holds the
    corners (1, -1, 11, 7)."""
    _, lab = run(transform(), [[(5.0, 3.0, 10.0, 8.0, 1)]])
    assert lab.shape == (1, 9, 6, 8)
    assert np.argwhere(lab[0, 0]).tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert lab[0, :, 1, 1].tolist() == [1, 1, -1, 11, 7, 0.1, 0.125, 1, 1]
    assert (lab[0, 8] == lab[0, 0]).all()


def test_two_images_and_mean_values():
    layer = transform(extra="transform_param { mean_value: 10 mean_value: 20 mean_value: 30 }",
                      shape=(2, 3, 24, 32))
    images = np.random.default_rng(1).uniform(0, 255, (2, 3, 24, 32))
    img, lab = run(layer, [[(5.0, 3.0, 10.0, 8.0, 1)], []], images)
    np.testing.assert_allclose(img, images - np.array([10, 20, 30])[None, :, None, None],
                               atol=1e-9)
    assert lab[0].any() and not lab[1].any()


def test_train_flip_and_centre_crop_of_a_larger_image():
    """TRAIN, flip_prob 1, crop_prob 0: mirrored, then the centred 32×24 window of 40×30
    (offset round(0.5·8), round(0.5·6)) = (4, 3); the box to W - x - w - 1 then shifted."""
    aug = ("flip_prob: 1 crop_prob: 0 scale_prob: 0 rotation_prob: 0 hue_rotation_prob: 0 "
           "desaturation_prob: 0")
    layer = transform(aug=aug, shape=(1, 3, 30, 40), phase=TRAIN)
    images = np.random.default_rng(2).uniform(0, 255, (1, 3, 30, 40))
    boxes = [(6.0, 8.0, 10.0, 8.0, 1)]
    img, lab = run(layer, [boxes], images)
    np.testing.assert_allclose(img[0], images[0, :, 3:27, ::-1][:, :, 4:36], atol=1e-9)
    moved = [(40 - 6.0 - 10.0 - 1 - 4, 8.0 - 3, 10.0, 8.0, 1)]
    np.testing.assert_allclose(lab[0], reference_grid(moved), rtol=1e-12)


def test_train_random_crop_pads_with_zeros_within_the_shift():
    """crop_prob 1, shift 8, same-size input: offset round(p·8 - 4) in [-4, 4], read back from
    where the constant image lands; the boxes move by the same offset."""
    aug = ("crop_prob: 1 shift_x: 8 shift_y: 8 flip_prob: 0 scale_prob: 0 rotation_prob: 0 "
           "hue_rotation_prob: 0 desaturation_prob: 0")
    layer = transform(aug=aug, phase=TRAIN)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(12):
        img, lab = run(layer, [[(8.0, 8.0, 8.0, 8.0, 1)]], np.full((1, 3, 24, 32), 7.0))
        assert set(np.unique(img[0])) <= {0.0, 7.0}
        rows, cols = np.nonzero(img[0, 0])
        ox = 32 - 1 - cols.max() if cols.min() == 0 else -cols.min()
        oy = 24 - 1 - rows.max() if rows.min() == 0 else -rows.min()
        assert abs(ox) <= 4 and abs(oy) <= 4
        expected = reference_grid([(8.0 - ox, 8.0 - oy, 8.0, 8.0, 1)])
        np.testing.assert_allclose(lab[0], expected, rtol=1e-12)
        offsets.add((ox, oy))
    assert len(offsets) > 3


NO_AUG = ("crop_prob: 0 flip_prob: 0 scale_prob: 0 rotation_prob: 0 hue_rotation_prob: 0 "
          "desaturation_prob: 0")


def test_test_phase_resizes_bicubically_and_scales_the_boxes():
    layer = transform(extra="transform_param { mean_value: 100 }", shape=(1, 3, 30, 40))
    images = np.random.default_rng(5).uniform(0, 255, (1, 3, 30, 40))
    boxes = [(5.0, 10.0, 20.0, 10.0, 1)]
    img, lab = run(layer, [boxes], images)
    hwc = (images[0].transpose(1, 2, 0) / 255 - 100 / 255)
    expected = cv2.resize(hwc, (32, 24), interpolation=cv2.INTER_CUBIC) * 255
    np.testing.assert_allclose(img[0], expected.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(lab[0], reference_grid([(4.0, 8.0, 16.0, 8.0, 1)]), rtol=1e-12)


def test_train_scaling_then_centre_crop():
    """scale 0.5 of 64×48 is 32×24: no crop left; the boxes halve."""
    aug = NO_AUG.replace("scale_prob: 0", "scale_prob: 1 scale_min: 0.5 scale_max: 0.5")
    layer = transform(aug=aug, shape=(1, 3, 48, 64), phase=TRAIN)
    images = np.random.default_rng(6).uniform(0, 255, (1, 3, 48, 64))
    img, lab = run(layer, [[(10.0, 12.0, 20.0, 16.0, 1)]], images)
    expected = cv2.resize(images[0].transpose(1, 2, 0) / 255, (32, 24),
                          interpolation=cv2.INTER_CUBIC) * 255
    np.testing.assert_allclose(img[0], expected.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(lab[0], reference_grid([(5.0, 6.0, 10.0, 8.0, 1)]), rtol=1e-12)


def test_train_hue_rotation_and_desaturation_in_hsv():
    """Every pixel's hue moves by one angle within ±30°, its saturation by one factor within
    [0.2, 1], its value stays (colorsys, float64); a grey pixel stays grey. The seed draws a
    negative angle, so hues near 0 wrap (OpenCV 4's vectorised HSV2BGR gets those wrong)."""
    aug = NO_AUG.replace("hue_rotation_prob: 0", "hue_rotation_prob: 1 hue_rotation: 30") \
        .replace("desaturation_prob: 0", "desaturation_prob: 1 desaturation_max: 0.8")
    layer = transform(aug=aug, phase=TRAIN)
    images = np.random.default_rng(7).uniform(30, 255, (1, 3, 24, 32))
    images[0, :, 0, 0] = 90.0
    torch.manual_seed(3)
    img, _ = run(layer, [[]], images)
    def hsv(chw):                                        # channels are B, G, R
        return np.array([colorsys.rgb_to_hsv(*(chw[::-1, y, x] / 255))
                         for y in range(24) for x in range(32)])
    before, after = hsv(images[0]), hsv(img[0])
    colour = before[:, 1] > 0.05
    shift = (after[colour, 0] - before[colour, 0] + 0.5) % 1 - 0.5
    ratio = after[colour, 1] / before[colour, 1]
    assert np.ptp(shift) < 1e-4 and -30 / 360 - 1e-6 <= shift[0] < 0
    assert np.ptp(ratio) < 1e-4 and 0.2 - 1e-6 <= ratio[0] < 1
    np.testing.assert_allclose(after[:, 2], before[:, 2], atol=1e-5)
    np.testing.assert_allclose(img[0, :, 0, 0], 90.0, atol=1e-4)


def test_train_rotation_moves_the_box_with_the_image():
    """A bright square rotated with the image: its centroid is where the label's box centre
    went (read back from the grid's corner channels)."""
    aug = NO_AUG.replace(" rotation_prob: 0", " rotation_prob: 1 max_rotate_degree: 20")
    layer = transform(aug=aug, phase=TRAIN)
    for seed in range(3):
        torch.manual_seed(seed)
        images = np.zeros((1, 3, 24, 32))
        images[0, :, 6:14, 10:18] = 255.0
        img, lab = run(layer, [[(10.0, 6.0, 8.0, 8.0, 1)]], images)
        ys, xs = np.nonzero(lab[0, 0])
        gy, gx = ys[0], xs[0]
        cx = (lab[0, 1, gy, gx] + lab[0, 3, gy, gx]) / 2 + gx * 4
        cy = (lab[0, 2, gy, gx] + lab[0, 4, gy, gx]) / 2 + gy * 4
        weight = img[0, 0]
        yy, xx = np.mgrid[:24, :32]
        assert (weight * xx).sum() / weight.sum() + 0.5 == pytest.approx(cx, abs=0.6)
        assert (weight * yy).sum() / weight.sum() + 0.5 == pytest.approx(cy, abs=0.6)
        assert lab[0, 5, gy, gx] == pytest.approx(1 / 8)      # the size is kept


def test_mean_file_is_resized_to_the_input_and_subtracted(tmp_path):
    mean = np.random.default_rng(8).uniform(0, 255, (1, 3, 12, 16))
    write_blobproto(tmp_path / "mean.binaryproto", mean)
    layer = transform(extra=f'transform_param {{ mean_file: "{tmp_path}/mean.binaryproto" }}')
    images = np.random.default_rng(9).uniform(0, 255, (1, 3, 24, 32))
    img, _ = run(layer, [[]], images)
    resized = cv2.resize(mean[0].transpose(1, 2, 0).astype(np.float32).astype(np.float64),
                         (32, 24), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
    np.testing.assert_allclose(img[0], images[0] - resized, atol=1e-6)


def test_refusals_name_the_field(tmp_path):
    with pytest.raises(LayerError, match="mean_file .*missing.binaryproto"):
        transform(extra=f'transform_param {{ mean_file: "{tmp_path}/missing.binaryproto" }}')
    with pytest.raises(LayerError, match="mean_value has 2 values"):
        transform(extra="transform_param { mean_value: 1 mean_value: 2 }")
    layer = transform()
    blob = label_blob([[]])
    blob[0, 0, 0, 1] = 15
    with pytest.raises(LayerError, match="rows of 15 values"):
        layer(torch.zeros(1, 3, 24, 32), torch.tensor(blob))
    blob = label_blob([[]])
    blob[0, 0, 0, 0] = 5
    with pytest.raises(LayerError, match="lists 5 boxes"):
        layer(torch.zeros(1, 3, 24, 32), torch.tensor(blob))


# -- a DetectNet-shaped train_val --------------------------------------------------------
def _layer(name, type_, bottoms, tops, body=""):
    text = f'layer {{ name: "{name}" type: "{type_}" '
    text += "".join(f'bottom: "{b}" ' for b in bottoms.split())
    text += "".join(f'top: "{t}" ' for t in tops.split())
    return text + body + " }\n"


def _conv(name, bottom, outputs):
    return _layer(name, "Convolution", bottom, name, "convolution_param { num_output: "
                  f"{outputs} kernel_size: 4 stride: 4 weight_filler {{ type: \"gaussian\" "
                  "std: 0.01 } }")


TRAIN_VAL = (
    'input: "data" input_dim: 2 input_dim: 3 input_dim: 24 input_dim: 32\n'
    'input: "label" input_dim: 2 input_dim: 1 input_dim: 5 input_dim: 16\n'
    + _layer("train_transform", "DetectNetTransformation", "data label",
             "transformed_data transformed_label",
             "detectnet_groundtruth_param { stride: 4 scale_cvg: 0.4 gridbox_type: GRIDBOX_MIN "
             "min_cvg_len: 4 obj_norm: true image_size_x: 32 image_size_y: 24 "
             "object_class { src: 1 dst: 0 } } detectnet_augmentation_param { crop_prob: 0 "
             "flip_prob: 0 scale_prob: 0 rotation_prob: 0 hue_rotation_prob: 0 "
             "desaturation_prob: 0 } transform_param { mean_value: 127 }")
    + _layer("slice-label", "Slice", "transformed_label",
             "foreground-label bbox-label size-label obj-label coverage-label",
             "slice_param { slice_dim: 1 slice_point: 1 slice_point: 5 slice_point: 7 "
             "slice_point: 8 }")
    + _layer("coverage-block", "Concat", "foreground-label " * 4, "coverage-block")
    + _layer("size-block", "Concat", "size-label size-label", "size-block")
    + _layer("obj-block", "Concat", "obj-label " * 4, "obj-block")
    + _layer("bb-label-norm", "Eltwise", "bbox-label size-block", "bbox-label-norm",
             "eltwise_param { operation: PROD }")
    + _layer("bb-obj-norm", "Eltwise", "bbox-label-norm obj-block", "bbox-obj-label-norm",
             "eltwise_param { operation: PROD }")
    + _conv("cvg", "transformed_data", 1)
    + _layer("coverage", "Sigmoid", "cvg", "coverage")
    + _conv("bboxes", "transformed_data", 4)
    + _layer("bbox_mask", "Eltwise", "bboxes coverage-block", "bboxes-masked",
             "eltwise_param { operation: PROD }")
    + _layer("bbox-norm", "Eltwise", "bboxes-masked size-block", "bboxes-masked-norm",
             "eltwise_param { operation: PROD }")
    + _layer("bbox-obj-norm", "Eltwise", "bboxes-masked-norm obj-block",
             "bboxes-obj-masked-norm", "eltwise_param { operation: PROD }")
    + _layer("bbox_loss", "L1Loss", "bboxes-obj-masked-norm bbox-obj-label-norm", "loss_bbox",
             "loss_weight: 2")
    + _layer("coverage_loss", "EuclideanLoss", "coverage coverage-label", "loss_coverage"))


def test_detectnet_train_val_runs_forward_backward_and_one_sgd_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLOG_minloglevel", "1")
    (tmp_path / "train_val.prototxt").write_text(TRAIN_VAL)
    (tmp_path / "solver.prototxt").write_text(
        'net: "train_val.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 1\n'
        "display: 0\n")
    solver = caffe.get_solver("solver.prototxt")
    net = solver.net
    boxes = [[(5.0, 3.0, 10.0, 8.0, 1), (14.0, 9.0, 15.0, 11.0, 1)], [(2.0, 2.0, 6.0, 6.0, 1)]]
    net.blobs["data"].data[...] = np.random.default_rng(4).uniform(0, 255, (2, 3, 24, 32))
    net.blobs["label"].data[...] = label_blob(boxes)
    net.forward()
    for n in range(2):
        np.testing.assert_allclose(net.blobs["transformed_label"].data[n],
                                   reference_grid(boxes[n], scale_cvg=0.4, grid_min=True,
                                                  min_len=4, obj_norm=True), rtol=1e-6)
    label = net.blobs["bbox-obj-label-norm"].data.astype(np.float64)
    pred = net.blobs["bboxes-obj-masked-norm"].data.astype(np.float64)
    assert float(net.blobs["loss_bbox"].data) == pytest.approx(np.abs(pred - label).sum() / 2,
                                                               rel=1e-5)
    net.backward()
    before = {k: [p.data.copy() for p in v] for k, v in net.params.items()}
    diffs = {k: [p.diff.copy() for p in v] for k, v in net.params.items()}
    assert np.abs(diffs["bboxes"][0]).sum() > 0 and np.abs(diffs["cvg"][0]).sum() > 0
    solver.step(1)
    for k, blobs in net.params.items():
        for p, old, diff in zip(blobs, before[k], diffs[k]):
            np.testing.assert_allclose(p.data, old - 0.01 * diff, rtol=1e-5, atol=1e-7)
