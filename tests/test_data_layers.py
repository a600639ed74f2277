"""Data layers against Caffe's first batches (goldens/data) and the prefetch/seed contract."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe_compat.engine import rng
from caffe_compat.formats.blob_io import read_text_proto, write_blobproto
from caffe_compat.data.convert import compute_mean, convert_imageset
from caffe_compat.engine.layers import TEST, TRAIN, LayerError, layer_class, layer_types
from caffe_compat.proto import caffe_pb2
from layer_utils import make_layer

GOLDEN = Path(__file__).parent / "goldens" / "data"
CASES = ["imagedata_test", "lmdb_test_meanfile_crop", "lmdb_test_meanvalue",
         "encoded_lmdb_gray", "hdf5_test"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("golden") / "data"
    shutil.copytree(GOLDEN, dst)
    return dst


@pytest.fixture
def in_golden(golden, monkeypatch) -> Path:
    monkeypatch.chdir(golden)          # the prototxts name their sources relative to here
    return golden


@pytest.fixture
def seeded():
    old = rng.get_seed()
    rng.set_seed(1234)
    yield
    rng._seed = old


def build(text: str, phase: int = TEST):
    return make_layer(text, [], phase)


def test_data_layers_are_registered():
    assert {"Data", "ImageData", "HDF5Data", "MemoryData", "LandmarkHeatmap"} <= set(layer_types())


@pytest.mark.parametrize("case", CASES)
def test_first_batch_equals_caffes(in_golden, case):
    net = read_text_proto(in_golden / f"{case}.prototxt", caffe_pb2.NetParameter)
    lp = net.layer[0]
    layer = layer_class(lp.type)(lp, [], TEST)
    expected = np.load(in_golden / "blobs.npz")
    data, label = layer()
    assert layer.top_shapes([]) == [tuple(data.shape), tuple(label.shape)]
    assert data.dtype == torch.float32 and label.dtype == torch.float32
    np.testing.assert_allclose(data.numpy(), expected[f"{case}/data"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(label.numpy(), expected[f"{case}/label"])
    layer.close()


DATA = ('name: "d" type: "Data" top: "data" top: "label" '
        'data_param {{ source: "{src}" backend: {backend} batch_size: {n} }} {extra}')


def test_wraps_around_in_key_order(in_golden):
    layer = build(DATA.format(src="color32_leveldb", backend="LEVELDB", n=7, extra=""))
    labels = np.concatenate([layer()[1].numpy() for _ in range(9)])      # 63 = 2 epochs + 3
    caffe_labels = np.load(in_golden / "blobs.npz")["lmdb_test_meanvalue/label"]
    np.testing.assert_array_equal(labels, np.concatenate([caffe_labels] * 3)[:63])


def test_several_nets_read_one_database(in_golden):
    text = DATA.format(src="color32_leveldb", backend="LEVELDB", n=10,
                       extra="transform_param { crop_size: 28 mirror: true }")
    train, test = build(text, TRAIN), build(text, TEST)
    again = build(DATA.format(src="color32_leveldb", backend="LEVELDB", n=30, extra=""))
    for _ in range(4):
        assert train()[0].shape == test()[0].shape == (10, 3, 28, 28)
    assert again()[0].shape == (30, 3, 32, 32)


def train_batches(text, count=4):
    layer = build(text, TRAIN)
    out = [tuple(t.clone() for t in layer()) for _ in range(count)]
    layer.close()
    return out


def test_train_order_and_draws_repeat_with_the_seed(in_golden, seeded, monkeypatch):
    text = DATA.format(src="color32_lmdb", backend="LMDB", n=8,
                       extra="transform_param { crop_size: 24 mirror: true }")
    first = train_batches(text)
    monkeypatch.setenv("CAFFE_COMPAT_DATA_WORKERS", "3")     # worker count changes nothing
    second = train_batches(text)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rng.set_seed(99)
    third = train_batches(text)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, third))
    # Random crops of the same records: each one is some 24×24 window of the 32×32 image.
    assert not torch.equal(first[0][0], first[1][0])


def test_imagedata_shuffles_every_epoch(in_golden, seeded):
    text = ('name: "d" type: "ImageData" top: "data" top: "label" image_data_param { '
            'source: "list.txt" root_folder: "images/" batch_size: 10 shuffle: true }')
    batches = train_batches(text, 6)
    labels = np.concatenate([b[1].numpy() for b in batches]).reshape(2, 30)
    listed = sorted(np.repeat(np.arange(10), 3))
    assert sorted(labels[0]) == listed and sorted(labels[1]) == listed
    assert not np.array_equal(labels[0], labels[1])
    assert not np.array_equal(labels[0], np.repeat(np.arange(10), 3))
    again = np.concatenate([b[1].numpy() for b in train_batches(text, 6)]).reshape(2, 30)
    np.testing.assert_array_equal(labels, again)


def test_follows_module_device_and_dtype(in_golden):
    layer = build(DATA.format(src="color32_lmdb", backend="LMDB", n=2, extra="")).double()
    data, label = layer()
    assert data.dtype == label.dtype == torch.float64


def test_one_top(in_golden):
    layer = build('name: "d" type: "Data" top: "data" '
                  'data_param { source: "gray_lmdb" backend: LMDB batch_size: 3 }')
    out = layer()
    assert torch.is_tensor(out) and out.shape == (3, 1, 28, 28)
    assert layer.top_shapes([]) == [(3, 1, 28, 28)]


def test_hdf5_crosses_the_end_of_the_file(in_golden):
    layer = build('name: "d" type: "HDF5Data" top: "data" top: "label" '
                  'hdf5_data_param { source: "h5list.txt" batch_size: 5 }')
    import h5py
    with h5py.File(in_golden / "small.h5", "r") as f:
        expected = f["data"][()]
    rows = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    data = np.concatenate([layer()[0].numpy() for _ in range(2)])
    np.testing.assert_array_equal(data, expected[rows])


def test_memory_data(in_golden):
    layer = build('name: "m" type: "MemoryData" top: "data" top: "label" '
                  'memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 }')
    assert layer.top_shapes([]) == [(2, 1, 2, 3), (2,)]
    with pytest.raises(LayerError, match="set_input_arrays"):
        layer()
    data = np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3)
    with pytest.raises(LayerError, match="multiple of batch_size 2"):
        layer.set_input_arrays(data[:3], np.zeros(3))
    layer.set_input_arrays(data, np.array([1, 2, 3, 4]))
    outs = [layer() for _ in range(3)]
    np.testing.assert_array_equal(outs[2][0].numpy(), data[:2])
    np.testing.assert_array_equal(outs[1][1].numpy(), [3, 4])


def test_landmarks_top_through_crop_and_mirror(golden, tmp_path, monkeypatch):
    marks = tmp_path / "marks.txt"
    lines = [line.split()[0] for line in (golden / "list.txt").read_text().splitlines()]
    rows = []
    for i, name in enumerate(lines):
        rows.append(f"{name} 3 1 " + " ".join(f"{'1' if k == 5 else '0'} {k + i % 5} {2 * k}"
                                                for k in range(8)))
    marks.write_text(f"{len(rows)}\nimage_name clothes_type variation_type ...\n"
                     + "\n".join(rows) + "\n")
    db = tmp_path / "db"
    convert_imageset(f"{golden}/images/", str(golden / "list.txt"), str(db),
                     resize_height=56, resize_width=56, landmark_file=str(marks))
    text = (f'name: "d" type: "Data" top: "data" top: "label" top: "lm" '
            f'transform_param {{ crop_size: 50 mirror: true }} '
            f'data_param {{ source: "{db}" backend: LMDB batch_size: 30 }}')
    layer = build(text, TEST)
    assert layer.top_shapes([]) == [(30, 3, 50, 50), (30,), (30, 8, 3)]
    data, _, lm = layer()
    plain = build(text.replace("mirror: true", ""), TEST)()[0].numpy()
    flips = 0
    for i in range(30):
        # stored: resized 28 -> 56 (x' = 2x + 0.5), then the centre crop removes 3 pixels
        expected = np.array([[2 * (k + i % 5) + 0.5 - 3, 2 * (2 * k) + 0.5 - 3, k != 5]
                             for k in range(8)], np.float32)
        if not np.array_equal(data[i].numpy(), plain[i]):
            np.testing.assert_array_equal(data[i].numpy()[:, :, ::-1], plain[i])
            expected[:, 0] = 49 - expected[:, 0]
            expected = expected.reshape(4, 2, 3)[:, ::-1].reshape(8, 3)   # left <-> right
            flips += 1
        np.testing.assert_allclose(lm[i].numpy(), expected, err_msg=f"item {i}")
    assert 0 < flips < 30


def test_imagedata_landmark_file(golden, tmp_path, monkeypatch):
    monkeypatch.chdir(golden)
    marks = tmp_path / "marks.txt"
    marks.write_text("1\nimage_name clothes_type variation_type\n"
                     "tshirt_top/00001.png 2 1 0 1 2 0 3 4 1 5 6 2 7 8\n")
    lst = tmp_path / "one.txt"
    lst.write_text("tshirt_top/00001.png 0\n")
    layer = build(f'name: "d" type: "ImageData" top: "data" top: "label" top: "lm" '
                  f'image_data_param {{ source: "{lst}" root_folder: "images/" batch_size: 2 '
                  f'new_height: 56 new_width: 56 landmark_file: "{marks}" }}')
    _, _, lm = layer()
    # clothes_type 2 (lower body): the 4 landmarks fill waist and hem; resized ×2
    # (x' = (x + 0.5)·2 − 0.5); the absent collar and sleeves are invisible (0, 0) points
    expected = np.tile(np.float32([0.5, 0.5, 0]), (8, 1))
    expected[4:] = [[2.5, 4.5, 1], [6.5, 8.5, 1], [10.5, 12.5, 0], [14.5, 16.5, 0]]
    np.testing.assert_allclose(lm[0].numpy(), expected)
    np.testing.assert_allclose(lm[1].numpy(), expected)


@pytest.mark.parametrize("text, message", [
    (DATA.format(src="nowhere", backend="LMDB", n=1, extra=""),
     r"layer 'd' \(Data\): nowhere: database does not exist"),
    (DATA.format(src="images", backend="LMDB", n=1, extra=""),
     r"images: not an LMDB or LevelDB database"),
    (DATA.format(src="color32_lmdb", backend="LEVELDB", n=1, extra=""),
     r"backend is leveldb \(set backend: LMDB\)"),
    (DATA.format(src="gray_lmdb", backend="LMDB", n=1,
                 extra='transform_param { mean_file: "mean_color32.binaryproto" }'),
     r"mean_color32.binaryproto: mean is 3×32×32 but the data is 1×28×28"),
    (DATA.format(src="gray_lmdb", backend="LMDB", n=0, extra=""), "batch_size must be positive"),
    ('name: "d" type: "Data" top: "a" top: "b" top: "c" '
     'data_param { source: "gray_lmdb" backend: LMDB batch_size: 1 }', "landmarks"),
    ('name: "d" type: "ImageData" top: "a" top: "b" '
     'image_data_param { source: "missing.txt" }', r"missing.txt: list file does not exist"),
    ('name: "d" type: "ImageData" top: "a" top: "b" '
     'image_data_param { source: "list.txt" root_folder: "nope/" }',
     r"list.txt:1: image 'nope/tshirt_top/00001.png' does not exist"),
    ('name: "d" type: "HDF5Data" top: "data" top: "label" '
     'hdf5_data_param { source: "list.txt" batch_size: 1 }', r"list.txt:1: HDF5 file"),
])
def test_setup_errors_name_the_file(in_golden, text, message):
    with pytest.raises(LayerError, match=message) as info:
        build(text)
    assert "\n" not in str(info.value)


def test_bad_image_during_training_names_the_line(in_golden, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("tshirt_top/00001.png 0\ntshirt_top/00002.png x\n")
    with pytest.raises(LayerError, match=r"list.txt:2: label 'x' is not an integer"):
        build(f'name: "d" type: "ImageData" top: "a" top: "b" '
              f'image_data_param {{ source: "{lst}" root_folder: "images/" }}')
    lst.write_text("tshirt_top/00001.png 0\ntshirt_top/gone.png 1\n")
    layer = build(f'name: "d" type: "ImageData" top: "a" top: "b" '
                  f'image_data_param {{ source: "{lst}" root_folder: "images/" }}')
    layer()
    with pytest.raises(LayerError, match=r"list.txt:2: image 'images/tshirt_top/gone.png' does "
                                         r"not exist"):
        layer()


def test_float_datum_and_mean_file_from_our_tools(in_golden, tmp_path):
    """A database of float_data records and a mean written by compute_mean, end to end."""
    from caffe_compat.formats.blob_io import array_to_datum
    from caffe_compat.data import DBWriter
    arrays = np.random.default_rng(0).normal(size=(6, 2, 5, 5)).astype(np.float32)
    with DBWriter(tmp_path / "f", "leveldb") as w:
        for i, a in enumerate(arrays):
            w.put(f"{i:08d}", array_to_datum(a, i).SerializeToString())
    mean = compute_mean(str(tmp_path / "f"))
    write_blobproto(tmp_path / "m.binaryproto", mean)
    layer = build(f'name: "d" type: "Data" top: "data" top: "label" '
                  f'transform_param {{ mean_file: "{tmp_path}/m.binaryproto" }} '
                  f'data_param {{ source: "{tmp_path}/f" batch_size: 6 }}')
    data, label = layer()
    np.testing.assert_array_equal(data.numpy(), arrays - mean)
    np.testing.assert_array_equal(label.numpy(), np.arange(6))
