"""tools/convert_imageset.py and the three-command default pipeline on a fresh checkout."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.formats.blob_io import read_blobproto, read_text_proto
from caffe_compat.data import open_db
from caffe_compat.formats.datum import decode_datum
from caffe_compat.engine.layers import TRAIN, layer_class
from caffe_compat.proto import caffe_pb2
from tool_utils import load_tool

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "goldens" / "data"


def fresh_checkout(tmp_path: Path, monkeypatch, *tools) -> list:
    """A checkout holding only the committed data/fashion50 files; tools pointed at it."""
    src = ROOT / "data" / "fashion50"
    dst = tmp_path / "data" / "fashion50"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train.txt", "test.txt"))
    modules = [load_tool(t) for t in tools]
    for m in modules:
        monkeypatch.setattr(m, "repo_root", lambda _file: tmp_path)
    return modules


def records(path):
    with open_db(path) as db:
        return list(db.items())


def test_caffe_flag_spellings_reproduce_the_golden_database(tmp_path):
    tool = load_tool("convert_imageset")
    out = tmp_path / "db"
    assert tool.main(["-resize_height=32", "--resize_width", "32", "--gray=false",
                      "--backend=leveldb", f"{GOLDEN}/images/", str(GOLDEN / "list.txt"),
                      str(out)]) == 0
    shutil.copytree(GOLDEN / "color32_leveldb", tmp_path / "golden")
    assert records(out) == records(tmp_path / "golden")


def test_errors_are_one_line(tmp_path, capsys):
    tool = load_tool("convert_imageset")
    assert tool.main([f"{GOLDEN}/images/", str(tmp_path / "nope.txt"), str(tmp_path / "db")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}/nope.txt: list file does not exist\n"
    assert tool.main(["a", "b"]) == 1
    assert "ROOTFOLDER/ LISTFILE DB_NAME" in capsys.readouterr().err
    (tmp_path / "l.txt").write_text("missing.png 0\n")
    assert tool.main([f"{tmp_path}/", str(tmp_path / "l.txt"), str(tmp_path / "db")]) == 1
    assert "no image could be read" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_help_documents_the_defaults(capsys):
    for name in ("convert_imageset", "compute_mean", "make_split", "prepare_default_data",
                 "annotate_landmarks", "prepare_fashion_mnist"):
        with pytest.raises(SystemExit) as info:
            load_tool(name).main(["--help"])
        assert info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("data/fashion50_lmdb/train", "mean.binaryproto", "--resize_height",
                   "--train-per-class", "default 40", "seed 0", "--overlay", "--idx-dir"):
        assert needle in text, needle


def test_three_commands_build_what_the_models_read(tmp_path, monkeypatch):
    split, convert, mean = fresh_checkout(tmp_path, monkeypatch, "make_split",
                                          "convert_imageset", "compute_mean")
    assert split.main([]) == 0 and convert.main([]) == 0 and mean.main([]) == 0
    for folder, side in (("fashion50_lmdb", 72), ("fashion50_lmdb_256", 256)):
        lmdb = tmp_path / "data" / folder
        train, test = records(lmdb / "train"), records(lmdb / "test")
        assert (len(train), len(test)) == (400, 100)
        img, label, marks = decode_datum(train[0][1])
        assert img.shape == (3, side, side) and marks.shape == (8, 3) and 0 <= label < 10
        assert read_blobproto(lmdb / "mean.binaryproto").shape == (1, 3, side, side)
    # every data layer of every model, in its phase, reads them (paths relative to the checkout)
    monkeypatch.chdir(tmp_path)
    built = 0
    for prototxt in sorted((ROOT / "models").glob("*/train_val.prototxt")):
        net = read_text_proto(prototxt, caffe_pb2.NetParameter)
        for lp in net.layer:
            if lp.type not in ("Data", "ImageData"):
                continue
            phase = lp.include[0].phase if lp.include else TRAIN
            layer = layer_class(lp.type)(lp, [], phase)
            tops = layer()
            assert [tuple(t.shape) for t in tops] == layer.top_shapes([]), prototxt
            assert abs(float(tops[0].mean())) < 40
            layer.close()
            built += 1
    assert built >= 2


def test_default_mode_takes_the_size_from_the_flags(tmp_path, monkeypatch, capsys):
    (convert,) = fresh_checkout(tmp_path, monkeypatch, "convert_imageset")
    assert convert.main(["--resize_height", "40", "--resize_width", "40", "--gray"]) == 0
    out = capsys.readouterr().out
    assert "train.txt" in out and "(400 records, 1×40×40, landmarks)" in out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fashion50",
                                                                   "fashion50_lmdb_40"]
    img, _, _ = decode_datum(records(tmp_path / "data" / "fashion50_lmdb_40" / "test")[0][1])
    assert img.shape == (1, 40, 40)
    assert convert.main(["--resize_height", "40", "--resize_width", "30"]) == 1


def test_encoded_with_landmarks(tmp_path):
    tool = load_tool("convert_imageset")
    marks = ROOT / "data" / "fashion50" / "list_landmarks.txt"
    assert tool.main(["--encoded", "--landmarks", str(marks), f"{GOLDEN}/images/",
                      str(GOLDEN / "list.txt"), str(tmp_path / "db")]) == 0
    key, value = records(tmp_path / "db")[0]
    img, label, lm = decode_datum(value)
    path = GOLDEN / "images" / key.decode().split("_", 1)[1]
    from caffe_compat.data.landmarks import read_landmarks
    np.testing.assert_array_equal(lm, read_landmarks(marks)[key.decode().split("_", 1)[1]])
    assert img.shape == (1, 28, 28) and path.is_file()
