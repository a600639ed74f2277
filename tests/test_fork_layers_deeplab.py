"""DeepLab v2's ImageSegData, SegAccuracy, MatWrite and MatRead (deeplab-public-ver2) against
hand-computed results and re-statements of the fork's transform (docs/forks.md)."""
import cv2
import numpy as np
import pytest
import scipy.io
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from layer_utils import make_layer

MEAN = (104.0, 117.0, 123.0)


def _write(tmp_path, sizes, label_values=6):
    """PNG images and label images of these (h, w); the list names them DeepLab's way
    (leading slash, joined to root_folder by concatenation)."""
    rng = np.random.default_rng(0)
    images, labels, lines = [], [], []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        lab = rng.integers(0, label_values, size=(h, w), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"img{i}.png"), img)
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), lab)
        images.append(img)
        labels.append(lab)
        lines.append(f"/img{i}.png /lab{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return images, labels


def _seg_net(tmp_path, phase, data="", transform="", tops=3):
    mean = " ".join(f"mean_value: {m}" for m in MEAN)
    names = ''.join(f' top: "{t}"' for t in ("data", "label", "data_dim")[:tops])
    text = (f'layer {{ name: "data" type: "ImageSegData"{names} transform_param {{ {mean} '
            f'{transform} }} image_data_param {{ source: "{tmp_path / "list.txt"}" '
            f'root_folder: "{tmp_path}" label_type: PIXEL batch_size: 1 {data} }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    return caffe.Net(str(tmp_path / "net.prototxt"), phase)


def padded_crop(img, lab, crop, scale=1.0, ignore=255):
    """The fork's TEST transform of one pair: pad bottom/right with the mean (labels with
    ignore_label) up to the crop, central crop, subtract the mean, scale."""
    h, w = img.shape[:2]
    ph, pw = max(crop[0] - h, 0), max(crop[1] - w, 0)
    data = np.empty((3, h + ph, w + pw))
    for c in range(3):
        data[c] = np.pad(img[:, :, c].astype(np.float64), ((0, ph), (0, pw)),
                         constant_values=MEAN[c])
    label = np.pad(lab.astype(np.float64), ((0, ph), (0, pw)), constant_values=ignore)
    y, x = (data.shape[1] - crop[0]) // 2, (data.shape[2] - crop[1]) // 2
    data = data[:, y:y + crop[0], x:x + crop[1]] - np.array(MEAN).reshape(3, 1, 1)
    return data * scale, label[y:y + crop[0], x:x + crop[1]]


def test_test_phase_pads_with_mean_and_ignore_label_then_crops_the_centre(tmp_path):
    images, labels = _write(tmp_path, [(8, 7), (5, 10)])
    net = _seg_net(tmp_path, caffe.TEST, "ignore_label: 250",
                   "crop_height: 6 crop_width: 9 scale: 0.5")
    assert net.blobs["data"].data.shape == (1, 3, 6, 9)
    for img, lab in zip(images, labels):
        net.forward()
        data, label = padded_crop(img, lab, (6, 9), 0.5, ignore=250)
        np.testing.assert_allclose(net.blobs["data"].data[0], data, rtol=1e-6)
        np.testing.assert_array_equal(net.blobs["label"].data[0, 0], label)
        np.testing.assert_array_equal(net.blobs["data_dim"].data.reshape(-1),
                                      [min(6, img.shape[0]), min(9, img.shape[1])])


def test_train_crop_and_mirror_move_image_and_label_together(tmp_path):
    images, labels = _write(tmp_path, [(7, 9)])
    net = _seg_net(tmp_path, caffe.TRAIN, "", "crop_size: 5 mirror: true", tops=2)
    seen = set()
    for _ in range(12):
        net.forward()
        data = net.blobs["data"].data[0] + np.array(MEAN).reshape(3, 1, 1)
        label = net.blobs["label"].data[0, 0]
        found = [(y, x, m) for y in range(3) for x in range(5) for m in (0, 1)
                 if np.array_equal(_window(images[0].transpose(2, 0, 1), y, x, m), data)
                 and np.array_equal(_window(labels[0][None], y, x, m)[0], label)]
        assert len(found) >= 1
        seen.update(found)
    assert len(seen) > 2 and {m for _, _, m in seen} == {0, 1}


def _window(a, y, x, mirror):
    w = a[:, y:y + 5, x:x + 5].astype(np.float64)
    return w[:, :, ::-1] if mirror else w


def test_scale_factors_resize_image_bilinear_and_labels_nearest(tmp_path):
    images, labels = _write(tmp_path, [(9, 11)])
    net = _seg_net(tmp_path, caffe.TEST, "", "scale_factors: 0.5 crop_height: 6 crop_width: 6")
    net.forward()
    size = (int(np.float32(11) * np.float32(0.5)), int(np.float32(9) * np.float32(0.5)))  # (5, 4)
    img = cv2.resize(images[0], size, interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(labels[0], size, interpolation=cv2.INTER_NEAREST)
    data, label = padded_crop(img, lab, (6, 6))
    np.testing.assert_allclose(net.blobs["data"].data[0], data, rtol=1e-6)
    np.testing.assert_array_equal(net.blobs["label"].data[0, 0], label)


def test_new_size_resizes_the_label_image_bilinearly_as_the_fork(tmp_path):
    images, labels = _write(tmp_path, [(6, 8)], label_values=200)
    net = _seg_net(tmp_path, caffe.TEST, "new_height: 4 new_width: 5")
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data[0, 0],
                                  cv2.resize(labels[0], (5, 4)))          # OpenCV's default
    assert net.blobs["data"].data.shape == (1, 3, 4, 5)


@pytest.mark.parametrize("label_type, line, value", [("IMAGE", "/img0.png 3", 3),
                                                     ("NONE", "/img0.png", 7)])
def test_image_and_none_label_types_fill_the_label(tmp_path, label_type, line, value):
    _write(tmp_path, [(4, 5)])
    (tmp_path / "list.txt").write_text(line + "\n")
    text = (f'layer {{ name: "d" type: "ImageSegData" top: "data" top: "label" '
            f'image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}" '
            f'label_type: {label_type} ignore_label: 7 }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    net.forward()
    assert (net.blobs["label"].data == value).all() and net.blobs["label"].data.shape == (1, 1, 4, 5)


@pytest.mark.parametrize("transform, message", [
    ("crop_height: 4", "give either crop_size or both crop_height and crop_width"),
    ("crop_size: 4 crop_height: 4 crop_width: 4", "give either crop_size or both"),
    ('mean_file: "m.binaryproto"', "mean_file is not supported by ImageSegData"),
])
def test_bad_transform_fields_name_the_layer(tmp_path, transform, message):
    _write(tmp_path, [(4, 5)])
    with pytest.raises(LayerError, match=rf"layer 'data' \(ImageSegData\): .*{message}"):
        _seg_net(tmp_path, caffe.TEST, "", transform)


def test_padding_without_mean_value_is_an_error(tmp_path):
    _write(tmp_path, [(4, 5)])
    text = (f'layer {{ name: "d" type: "ImageSegData" top: "data" top: "label" transform_param '
            f'{{ crop_size: 6 }} image_data_param {{ source: "{tmp_path / "list.txt"}" '
            f'root_folder: "{tmp_path}" label_type: PIXEL }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    with pytest.raises(LayerError, match="smaller than the crop 6×6: DeepLab pads it with mean_value"):
        net.forward()


def test_other_data_layers_refuse_deeplab_transform_fields(tmp_path):
    _write(tmp_path, [(4, 5)])
    (tmp_path / "images.txt").write_text("img0.png 0\n")
    text = (f'layer {{ name: "d" type: "ImageData" top: "data" top: "l" transform_param '
            f'{{ scale_factors: 0.5 }} image_data_param {{ source: "{tmp_path / "images.txt"}" '
            f'root_folder: "{tmp_path}/" batch_size: 1 }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    with pytest.raises(LayerError, match="scale_factors is DeepLab v2's: only an ImageSegData"):
        caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)


SEG_ACC = 'name: "acc" type: "SegAccuracy" seg_accuracy_param { ignore_label: 255 %s }'


def _scores(pred, classes=3):
    """One-hot scores (N, C, H, W) predicting ``pred`` (N, H, W)."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred), classes).permute(0, 3, 1, 2).double()


def test_seg_accuracy_against_a_hand_counted_confusion_matrix():
    label = torch.tensor([[[0, 0, 1], [1, 2, 255]]]).double().unsqueeze(1)
    pred = [[[0, 1, 1], [1, 1, 0]]]
    layer = make_layer(SEG_ACC % "", [(1, 3, 2, 3), (1, 1, 2, 3)])
    out = layer(_scores(pred), label)
    # rows = label, columns = prediction: [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert out.shape == (1, 1, 1, 3)
    iou = [1 / 2, 2 / 4, 0 / 1]
    np.testing.assert_allclose(out.reshape(-1), [3 / 5, (1 / 2 + 1 + 0) / 3, sum(iou) / 3])
    assert layer.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_seg_accuracy_accumulates_without_reset_and_counts_absent_classes_as_iou_one():
    label = torch.zeros(1, 1, 1, 2).double()
    layer = make_layer(SEG_ACC % "reset: false", [(1, 3, 1, 2), (1, 1, 1, 2)])
    layer(_scores([[[0, 0]]]), label)
    out = layer(_scores([[[0, 1]]]), label)
    # matrix [[3, 1, 0], [0, 0, 0], [0, 0, 0]]: IU 3/4, 0/1, and 1 for class 2 (absent)
    np.testing.assert_allclose(out.reshape(-1), [3 / 4, 3 / 4, (3 / 4 + 0 + 1) / 3])
    fresh = make_layer(SEG_ACC % "", [(1, 3, 1, 2), (1, 1, 1, 2)])
    fresh(_scores([[[0, 0]]]), label)
    np.testing.assert_allclose(fresh(_scores([[[0, 1]]]), label).reshape(-1),
                               [1 / 2, 1 / 2, (1 / 2 + 0 + 1) / 3])


def test_seg_accuracy_ties_go_to_the_highest_class():
    layer = make_layer(SEG_ACC % "", [(1, 3, 1, 1), (1, 1, 1, 1)])
    scores = torch.tensor([2.0, 5.0, 5.0]).view(1, 3, 1, 1).double()
    layer(scores, torch.full((1, 1, 1, 1), 2.0).double())
    assert layer.confusion[2, 2] == 1


def test_seg_accuracy_rejects_bad_labels_and_shapes():
    layer = make_layer(SEG_ACC % "", [(1, 3, 2, 2), (1, 1, 2, 2)])
    with pytest.raises(LayerError, match=r"layer 'acc' \(SegAccuracy\): unexpected label 3 "
                       r"\(item 0, row 1, column 0\)"):
        layer(torch.zeros(1, 3, 2, 2).double(), torch.tensor([0, 1, 3, 0.]).view(1, 1, 2, 2))
    with pytest.raises(LayerError, match=r"labels \[1, 2, 2, 2\] must be N×1×H×W"):
        make_layer(SEG_ACC % "", [(1, 3, 2, 2), (1, 2, 2, 2)])


def _mat_write_net(tmp_path, param):
    text = ('input: "a" input_shape { dim: 2 dim: 3 dim: 2 dim: 4 } '
            'input: "b" input_shape { dim: 1 dim: 2 } '
            f'layer {{ name: "w" type: "MatWrite" bottom: "a" bottom: "b" mat_write_param {{ {param} }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    return caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)


def test_mat_write_files_read_back_with_scipy_in_matlab_order(tmp_path):
    (tmp_path / "ids.txt").write_text("2007_000033.jpg x\n2007_000042.jpg\n")
    net = _mat_write_net(tmp_path, f'prefix: "{tmp_path}/fc8_" source: "{tmp_path / "ids.txt"}" '
                                   'strip: 4')
    a = np.arange(48, dtype=np.float32).reshape(2, 3, 2, 4)
    net.blobs["a"].data[...] = a
    net.blobs["b"].data[...] = [[5, 6]]
    net.forward()
    data = scipy.io.loadmat(str(tmp_path / "fc8_2007_000033_blob_0.mat"))["data"]
    assert data.dtype == np.float32 and data.shape == (4, 2, 3, 2)       # [W H C N]
    for n, c, h, w in np.ndindex(a.shape):
        assert data[w, h, c, n] == a[n, c, h, w]
    b = scipy.io.loadmat(str(tmp_path / "fc8_2007_000033_blob_1.mat"))["data"]
    assert b.shape == (1, 1, 2, 1) and b.reshape(-1).tolist() == [5, 6]
    net.forward()
    assert (tmp_path / "fc8_2007_000042_blob_0.mat").exists()
    with pytest.raises(LayerError, match=r"layer 'w' \(MatWrite\): forward 3 but the source list "
                       r"names 2 files"):
        net.forward()


def test_mat_write_period_and_iteration_names(tmp_path):
    net = _mat_write_net(tmp_path, f'prefix: "{tmp_path}/out_" period: 2')
    for _ in range(3):
        net.forward()
    written = sorted(p.name for p in tmp_path.glob("out_*"))
    assert written == ["out_iter_0_blob_0.mat", "out_iter_0_blob_1.mat",
                       "out_iter_2_blob_0.mat", "out_iter_2_blob_1.mat"]


@pytest.mark.parametrize("param, message", [
    ("period: 1", r"mat_write_param.prefix is required"),
    ('prefix: "x" period: 0', r"mat_write_param.period \(0\) must be positive"),
    ('prefix: "x" strip: -1', r"strip \(-1\) cannot be negative"),
    ('prefix: "x" source: "/nonexistent/ids.txt"', r"/nonexistent/ids.txt: no such list file"),
])
def test_mat_write_bad_parameters(tmp_path, param, message):
    with pytest.raises(LayerError, match=rf"layer 'w' \(MatWrite\): .*{message}"):
        _mat_write_net(tmp_path, param)


def test_mat_read_reads_what_mat_write_wrote_and_wraps(tmp_path):
    rng = np.random.default_rng(1)
    blobs = [rng.normal(size=(1, 3, 2, 4)).astype(np.float32) for _ in range(3)]
    for i, blob in enumerate(blobs):
        scipy.io.savemat(str(tmp_path / f"f{i}_blob_0.mat"), {"data": blob.transpose(3, 2, 1, 0)})
    (tmp_path / "ids.txt").write_text("f0\nf1\nf2\n")
    text = (f'layer {{ name: "r" type: "MatRead" top: "x" mat_read_param {{ prefix: "{tmp_path}/" '
            f'source: "{tmp_path / "ids.txt"}" batch_size: 2 }} }}')
    (tmp_path / "net.prototxt").write_text(text)
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    np.testing.assert_array_equal(net.forward()["x"], np.concatenate(blobs[:2]))
    np.testing.assert_array_equal(net.forward()["x"], np.concatenate([blobs[2], blobs[0]]))


def test_mat_read_refuses_double_data_and_a_missing_source(tmp_path):
    scipy.io.savemat(str(tmp_path / "f0_blob_0.mat"), {"data": np.zeros((2, 2))})
    (tmp_path / "ids.txt").write_text("f0\n")
    with pytest.raises(LayerError, match=r"layer 'r' \(MatRead\): .*'data' is float64, DeepLab "
                       r"reads single"):
        make_layer(f'name: "r" type: "MatRead" top: "x" mat_read_param {{ prefix: "{tmp_path}/" '
                   f'source: "{tmp_path / "ids.txt"}" }}', [])
    with pytest.raises(LayerError, match="mat_read_param.source must name at least one file"):
        make_layer('name: "r" type: "MatRead" top: "x" mat_read_param { prefix: "p" }', [])


DEEPLAB_TEST = '''name: "deeplab"
layer { name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim"
  include { phase: TEST }
  transform_param { mirror: false crop_size: 9 mean_value: 104 mean_value: 117 mean_value: 123 }
  image_data_param { root_folder: "ROOT" source: "ROOT/test.txt" batch_size: 1 label_type: NONE } }
layer { name: "fc8" type: "Convolution" bottom: "data" top: "fc8"
  convolution_param { num_output: 2 kernel_size: 3 stride: 2 dilation: 1
    weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "fc8_interp" type: "Interp" bottom: "fc8" top: "fc8_interp" interp_param { zoom_factor: 2 } }
layer { name: "fc8_mat" type: "MatWrite" bottom: "fc8_interp" include { phase: TEST }
  mat_write_param { prefix: "ROOT/features/" source: "ROOT/test_id.txt" strip: 0 period: 1 } }
layer { name: "silence" type: "Silence" bottom: "label" bottom: "data_dim" include { phase: TEST } }
'''


def test_a_deeplab_test_net_writes_one_mat_file_per_image(tmp_path):
    _write(tmp_path, [(7, 8), (6, 5)])
    (tmp_path / "test.txt").write_text("/img0.png\n/img1.png\n")
    (tmp_path / "test_id.txt").write_text("img0\nimg1\n")
    (tmp_path / "features").mkdir()
    (tmp_path / "net.prototxt").write_text(DEEPLAB_TEST.replace("ROOT", str(tmp_path)))
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    for name in ("img0", "img1"):
        net.forward()
        data = scipy.io.loadmat(str(tmp_path / "features" / f"{name}_blob_0.mat"))["data"]
        assert data.shape == (7, 7, 2, 1)                        # [W H C N] of (1, 2, 7, 7)
        np.testing.assert_allclose(data.transpose(3, 2, 1, 0), net.blobs["fc8_interp"].data)
