"""SegNet's DenseImageData: image + label-image pairs, the same crop/mirror for both."""
import cv2
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError


def _write_pairs(tmp_path, n=3, h=6, w=8):
    rng = np.random.default_rng(0)
    lines, images, labels = [], [], []
    for i in range(n):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        lab = rng.integers(0, 5, size=(h, w), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"img{i}.png"), img)
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), lab)
        lines.append(f"img{i}.png lab{i}.png")
        images.append(img)
        labels.append(lab)
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return images, labels


def _net(tmp_path, body, transform=""):
    text = (f'layer {{ name: "d" type: "DenseImageData" top: "data" top: "label" {transform} '
            f'dense_image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" {body} }} }}')
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TRAIN)


def test_pairs_in_order_with_mean_and_scale(tmp_path):
    images, labels = _write_pairs(tmp_path)
    net = _net(tmp_path, "batch_size: 2", 'transform_param { scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30 }')
    net.forward()
    expected = (np.stack(images[:2]).transpose(0, 3, 1, 2) - np.array([10, 20, 30]).reshape(1, 3, 1, 1)) * 0.5
    np.testing.assert_allclose(net.blobs["data"].data, expected, rtol=1e-6)
    np.testing.assert_array_equal(net.blobs["label"].data[:, 0], np.stack(labels[:2]))
    net.forward()                                     # wraps around the 3-line list
    np.testing.assert_array_equal(net.blobs["label"].data[:, 0], np.stack([labels[2], labels[0]]))


def test_crop_and_mirror_treat_image_and_label_alike(tmp_path):
    images, labels = _write_pairs(tmp_path, n=1)
    net = _net(tmp_path, "batch_size: 1 crop_height: 4 crop_width: 5 mirror: true")
    for _ in range(6):
        net.forward()
        img = net.blobs["data"].data[0].transpose(1, 2, 0)
        lab = net.blobs["label"].data[0, 0]
        assert img.shape == (4, 5, 3) and lab.shape == (4, 5)
        found = False
        for src_img, src_lab in ((images[0], labels[0]), (images[0][:, ::-1], labels[0][:, ::-1])):
            for y in range(3):
                for x in range(4):
                    if np.array_equal(src_img[y:y + 4, x:x + 5], img):
                        assert np.array_equal(src_lab[y:y + 4, x:x + 5], lab)
                        found = True
        assert found


def test_resize_keeps_label_ids_and_errors_name_the_list_line(tmp_path):
    _write_pairs(tmp_path)
    net = _net(tmp_path, "batch_size: 3 new_height: 12 new_width: 16")
    net.forward()
    assert net.blobs["data"].data.shape == (3, 3, 12, 16)
    assert set(np.unique(net.blobs["label"].data)) <= {0, 1, 2, 3, 4}
    (tmp_path / "list.txt").write_text("img0.png missing.png\n")
    with pytest.raises(LayerError, match=r"list.txt:1: image 'missing.png' does not exist"):
        _net(tmp_path, "batch_size: 1")


def test_mean_file_is_subtracted_from_the_image_before_the_crop(tmp_path):
    from caffe_compat.formats.blob_io import write_blobproto
    images, labels = _write_pairs(tmp_path)
    mean = np.random.default_rng(1).uniform(0, 255, size=(3, 6, 8)).astype(np.float32)
    write_blobproto(tmp_path / "mean.binaryproto", mean)
    net = _net(tmp_path, "batch_size: 3 crop_height: 4 crop_width: 5",
               f'transform_param {{ scale: 0.25 mean_file: "{tmp_path / "mean.binaryproto"}" }}')
    net.forward()
    label = net.blobs["label"].data[:, 0]
    for i, img in enumerate(images):                 # find each crop's window from its label
        full = (img.transpose(2, 0, 1) - mean) * 0.25
        hits = [(y, x) for y in range(3) for x in range(4)
                if np.array_equal(labels[i][y:y + 4, x:x + 5], label[i])]
        assert any(np.allclose(net.blobs["data"].data[i], full[:, y:y + 4, x:x + 5], rtol=1e-5)
                   for y, x in hits), i
    assert np.abs(net.blobs["data"].data).max() > 1   # a real image minus a real mean


def test_mean_file_of_another_size_or_with_mean_value_is_refused(tmp_path):
    from caffe_compat.formats.blob_io import write_blobproto
    _write_pairs(tmp_path)
    write_blobproto(tmp_path / "mean.binaryproto", np.zeros((3, 5, 8), np.float32))
    with pytest.raises(LayerError, match=r"mean is 3×5×8 but the images are 3×6×8"):
        _net(tmp_path, "batch_size: 1",
             f'transform_param {{ mean_file: "{tmp_path / "mean.binaryproto"}" }}')
    with pytest.raises(LayerError, match="mean_file and mean_value"):
        _net(tmp_path, "batch_size: 1",
             f'transform_param {{ mean_file: "{tmp_path / "mean.binaryproto"}" mean_value: 1 }}')
