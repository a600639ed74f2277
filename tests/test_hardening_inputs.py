"""Issue 27, hostile inputs: images and parameter blobs against the memory budget, shapes
(axes, empty batches, blob reshapes), the linear Concat build, error context said once,
Python layers checked before import, and the solver/tool frictions a new user met."""
from __future__ import annotations

import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.commands import convert_imageset, extract_features
from caffe_compat.engine.layers.base import LayerError
from caffe_compat.formats.errors import DataError, ResourceError, with_context
from caffe_compat.formats.images import read_image

ROOT = Path(__file__).resolve().parents[1]


def _net(tmp_path: Path, text: str, phase=caffe.TEST):
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase)


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width×height (grey, 8 bit) over one tiny IDAT chunk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def big_png(tmp_path, monkeypatch) -> Path:
    """A real 4000×4000 PNG (16 KB on disk) that decodes to 32 MB, under an 8 MB budget."""
    monkeypatch.setenv("CAFFE_COMPAT_MEMORY_BUDGET", "8M")
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((4000, 4000), np.uint8))
    assert path.stat().st_size < 100_000
    return path


# ------------------------------------------------------------------------ images
def test_image_file_over_the_budget_is_refused_before_decoding(big_png):
    with pytest.raises(DataError, match=r"^list.txt:3: image '.*big.png': image 4000×4000 "
                                        r"needs .* memory budget"):
        read_image(str(big_png), where="list.txt:3")
    with pytest.raises(DataError, match=r"image '.*big.png'.*memory budget"):
        caffe.io.load_image(str(big_png))
    with open(big_png, "rb") as f, pytest.raises(DataError, match=r"big.png'.*memory budget"):
        caffe.io.load_image(f)                           # a file object, as open_nsfw passes


def test_png_header_bigger_than_opencv_allows_is_a_clean_error(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_declaring(100000, 100000))     # OpenCV: CV_IO_MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="huge.png"):       # never a raw cv2.error
        read_image(str(path), where="list.txt:1")
    with pytest.raises(DataError, match="huge.png"):
        caffe.io.load_image(str(path))


def test_tiff_headers_are_read_too(tmp_path, monkeypatch):
    path = tmp_path / "small.tif"
    cv2.imwrite(str(path), np.full((30, 40, 3), 9, np.uint8))
    assert read_image(str(path)).shape == (30, 40, 3)
    raw = bytearray(path.read_bytes())
    ifd = struct.unpack("<I", raw[4:8])[0]
    for pos in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", raw[ifd:ifd + 2])[0], 12):
        tag, kind = struct.unpack("<HH", raw[pos:pos + 4])
        if tag in (256, 257):                      # width and length: 20000 each
            raw[pos + 2:pos + 12] = struct.pack("<HII", 4, 1, 20000)
    path.write_bytes(bytes(raw))
    monkeypatch.setenv("CAFFE_COMPAT_MEMORY_BUDGET", "64M")
    with pytest.raises(DataError, match=r"small.tif': image 20000×20000 needs .* memory budget"):
        read_image(str(path))


def test_image_list_names_the_line_and_file_of_an_oversized_image(tmp_path, big_png):
    (tmp_path / "list.txt").write_text(f"{big_png.name} 0\n")
    text = ('layer { name: "data" type: "ImageData" top: "data" top: "label" image_data_param '
            f'{{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 1 }} }}')
    with pytest.raises(ValueError, match=r"list.txt:1: image '.*big.png'.*memory budget"):
        _net(tmp_path, text, caffe.TRAIN).forward()


def test_convert_imageset_reports_an_oversized_image_in_one_line(tmp_path, big_png, capsys):
    cv2.imwrite(str(tmp_path / "small.png"), np.full((4, 4, 3), 7, np.uint8))
    (tmp_path / "list.txt").write_text("small.png 1\nbig.png 0\n")
    rc = convert_imageset.main([f"{tmp_path}/", str(tmp_path / "list.txt"),
                                str(tmp_path / "out_lmdb")])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert rc == 0 and "Traceback" not in text and "cv2.error" not in text
    assert "1 unreadable images skipped" in captured.out
    (tmp_path / "only_big.txt").write_text("big.png 0\n")
    rc = convert_imageset.main([f"{tmp_path}/", str(tmp_path / "only_big.txt"),
                                str(tmp_path / "out2_lmdb")])
    text = "".join(capsys.readouterr())
    assert rc != 0 and "Traceback" not in text and "no image could be read" in text


# ------------------------------------------------------------------------ parameter blobs
def test_parameter_blobs_are_budgeted_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFE_COMPAT_MEMORY_BUDGET", "64M")
    text = ('input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 2000000 } }')
    with pytest.raises(LayerError, match=r"layer 'ip' \(InnerProduct\): parameter blob: shape "
                                         r"\[2000000, 192\] needs 1.4 GiB, more than the "
                                         r"memory budget of 64.0 MiB"):
        _net(tmp_path, text)
    param = ('layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { '
             'dim: 100000 dim: 100000 } } }')
    with pytest.raises(LayerError, match=r"layer 'p' \(Parameter\): parameter blob.*37.3 GiB"):
        _net(tmp_path, param)


# ------------------------------------------------------------------------ shapes
def test_more_than_32_axes_is_refused_with_caffes_limit(tmp_path):
    dims = lambda n: "input_shape { " + "dim: 1 " * n + "}"
    assert _net(tmp_path, f'input: "data" {dims(32)}').blobs["data"].shape == (1,) * 32
    with pytest.raises(LayerError, match="has 100 axes; Caffe's blobs have at most 32"):
        _net(tmp_path, f'input: "data" {dims(100)}')


@pytest.mark.parametrize("layer", [
    'layer { name: "d" type: "Input" top: "data" input_param { shape { dim: -0 dim: 3 '
    'dim: 14 dim: 14 } } }',
    'layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 2 dim: 0 '
    'dim: 14 dim: 14 } } }',
    'layer { name: "d" type: "DummyData" top: "data" dummy_data_param { num: -0 channels: 1 '
    'height: 14 width: 14 } }'])
def test_an_empty_batch_is_refused_at_build(tmp_path, layer):
    net = layer + ('\nlayer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                   'convolution_param { num_output: 2 kernel_size: 3 } }')
    with pytest.raises(LayerError, match=r"layer 'd' \(\w+\) top 'data': shape \[.*\] has a "
                                         "zero dimension"):
        _net(tmp_path, net)


@pytest.mark.parametrize("shape, message", [
    ((100000, 100000, 100, 100), r"needs 727.6 TiB, more than the memory budget"),
    ((-1, 3), r"negative dimension in shape \[-1, 3\]"),
    ((2**31, 2**31), r"more than the memory budget"),
    (("a",), r"must be whole numbers"),
    ((1,) * 33, r"33 axes"),
])
def test_blob_reshape_refuses_bad_shapes_naming_the_blob(tmp_path, shape, message):
    net = _net(tmp_path, 'input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }')
    with pytest.raises(ResourceError, match=r"^blob 'data': .*" + message):
        net.blobs["data"].reshape(*shape)
    assert net.blobs["data"].shape == (1, 3, 8, 8)       # left as it was
    net.blobs["data"].reshape([2, 3, 8, 8])              # a list still works, as in pycaffe
    assert net.blobs["data"].data.shape == (2, 3, 8, 8)


def test_net_reshape_budgets_every_blob_it_resizes(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFE_COMPAT_MEMORY_BUDGET", "64M")
    net = _net(tmp_path, 'input: "data" input_shape { dim: 1 dim: 1 dim: 8 dim: 8 }\n'
               'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
               'convolution_param { num_output: 256 kernel_size: 1 } }')
    net.blobs["data"].reshape(1, 1, 1000, 1000)          # 8 MB with its diff: fine
    with pytest.raises(ResourceError, match=r"^blob 'conv': shape \[1, 256, 1000, 1000\] "
                                            r"needs 1.9 GiB"):
        net.reshape()


def test_concat_of_many_copies_of_one_bottom_builds_and_runs(tmp_path):
    """The build once removed each Split top from a list (quadratic: 100k copies took
    minutes); benchmarks/concat_build.py times it. Here: the result is right."""
    copies = 3000
    bottoms = " ".join(['bottom: "data"'] * copies)
    net = _net(tmp_path, 'input: "data" input_shape { dim: 1 dim: 2 }\n'
               f'layer {{ name: "c" type: "Concat" {bottoms} top: "c" }}')
    x = np.array([[1.5, -2.0]], np.float32)
    out = net.forward(data=x)["c"]
    np.testing.assert_array_equal(out, np.tile(x, (1, copies)))


# ------------------------------------------------------------------------ error context
def test_a_layer_error_names_its_layer_once(tmp_path):
    from caffe_compat.data.db import DBWriter
    from caffe_compat.formats.blob_io import array_to_datum
    with DBWriter(tmp_path / "db", "lmdb") as w:
        w.put("0", array_to_datum(np.zeros((3, 32, 32), np.uint8), 0).SerializeToString())
    text = ('layer { name: "data" type: "Data" top: "data" top: "label" transform_param { '
            f'crop_size: 64 }} data_param {{ source: "{tmp_path}/db" backend: LMDB '
            'batch_size: 1 } }')
    with pytest.raises(ValueError) as info:
        _net(tmp_path, text, caffe.TRAIN).forward()
    assert str(info.value).count("layer 'data' (Data)") == 1
    assert "crop_size 64 is larger than the 32×32 image" in str(info.value)


def test_with_context_adds_only_what_is_missing():
    assert with_context("x failed", "net.prototxt", "layer 'a' (ReLU)") == \
        "net.prototxt: layer 'a' (ReLU): x failed"
    assert with_context("layer 'a' (ReLU): x failed", "net.prototxt", "layer 'a' (ReLU)") == \
        "net.prototxt: layer 'a' (ReLU): x failed"
    assert with_context("net.prototxt: layer 'a' (ReLU): x", "net.prototxt", "") == \
        "net.prototxt: layer 'a' (ReLU): x"


# ------------------------------------------------------------------------ Python layers
@pytest.mark.parametrize("module, layer, message", [
    ("this", "Layer", "standard-library module"),
    ("no_such_module_27", "Layer", "no module 'no_such_module_27' on the Python path"),
    ("a-b", "Layer", "not a Python module name"),
    ("pylayer_examples", "import", "not a Python class name"),
])
def test_python_layer_is_checked_before_its_module_is_imported(tmp_path, module, layer,
                                                                message):
    code = (f"import sys, caffe_compat as caffe\n"
            f"open('{tmp_path}/n.prototxt', 'w').write('input: \"d\" input_shape {{ dim: 1 }} '"
            f"'layer {{ name: \"py\" type: \"Python\" bottom: \"d\" top: \"o\" python_param "
            f"{{ module: \"{module}\" layer: \"{layer}\" }} }}')\n"
            f"try:\n    caffe.Net('{tmp_path}/n.prototxt', caffe.TEST)\n"
            f"except ValueError as e:\n    print('ERROR', e)\n"
            f"print('IMPORTED' if {module!r} in sys.modules else 'NOT IMPORTED')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT / "tests", timeout=120).stdout
    assert message in out and "NOT IMPORTED" in out
    assert "Beautiful is better than ugly" not in out       # `this` never ran


# ------------------------------------------------------------------------ frictions
def test_solver_with_test_interval_but_no_test_iter_warns(tmp_path, caplog):
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 '
        'dim: 3 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" '
        'inner_product_param { num_output: 2 } }')
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt"\ntest_interval: 5\nbase_lr: 0.1\nlr_policy: "fixed"\n')
    with caplog.at_level(logging.WARNING, logger="caffe_compat"):
        solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    assert not solver.test_nets
    assert "test_interval is 5 but no test_iter is given" in caplog.text
    (tmp_path / "solver2.prototxt").write_text(
        f'train_net: "{tmp_path}/net.prototxt"\ntest_net: "{tmp_path}/net.prototxt"\n'
        'test_interval: 5\nbase_lr: 0.1\nlr_policy: "fixed"\n')
    with pytest.raises(ValueError, match="test_iter must be specified for each test network"):
        caffe.get_solver(str(tmp_path / "solver2.prototxt"))


def test_extract_features_help_is_usage_on_stdout(capsys):
    assert extract_features.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Usage: extract_features") and not err
    assert extract_features.main([]) == 1                   # too few arguments: still an error
    assert "Usage" in capsys.readouterr().err
