"""Datum databases: the project's convert_imageset/compute_mean reproduce Caffe's files exactly."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.formats.blob_io import read_blobproto, write_blobproto
from caffe_compat.data import DataError, DBWriter, detect_backend, open_db
from caffe_compat.data.convert import compute_mean, convert_imageset
from caffe_compat.formats.datum import decode_datum

GOLDEN = Path(__file__).parent / "goldens" / "data"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """A private copy of goldens/data (opening a LevelDB rewrites its files)."""
    dst = tmp_path_factory.mktemp("golden") / "data"
    shutil.copytree(GOLDEN, dst)
    return dst


def records(path) -> list[tuple[bytes, bytes]]:
    with open_db(path) as db:
        return list(db.items())


CASES = {  # golden database -> convert_imageset flags that made it
    "color32_lmdb": dict(resize_height=32, resize_width=32),
    "gray_lmdb": dict(gray=True),
    "color32_leveldb": dict(resize_height=32, resize_width=32, backend="leveldb"),
    "encoded_lmdb": dict(encoded=True, encode_type="png"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_convert_imageset_matches_caffe_record_by_record(golden, tmp_path, name):
    out = tmp_path / name
    report = convert_imageset(f"{golden}/images/", str(golden / "list.txt"), str(out),
                              **CASES[name])
    assert report.written == 30 and not report.skipped
    assert detect_backend(out) == CASES[name].get("backend", "lmdb")
    mine, caffe = records(out), records(golden / name)
    assert [k for k, _ in mine] == [k for k, _ in caffe]
    for (key, a), (_, b) in zip(mine, caffe):
        assert a == b, key


def test_encoded_records_decode_to_the_listed_pixels(golden):
    import cv2
    for key, value in records(golden / "encoded_lmdb"):
        img, label, marks = decode_datum(value)
        path = key.decode().split("_", 1)[1]
        expected = cv2.imread(str(golden / "images" / path), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(img[0], expected)
        assert marks is None and img.dtype == np.uint8


@pytest.mark.parametrize("db, mean", [("color32_lmdb", "mean_color32.binaryproto"),
                                      ("color32_leveldb", "mean_color32.binaryproto"),
                                      ("gray_lmdb", "mean_gray.binaryproto"),
                                      ("encoded_lmdb", "mean_gray.binaryproto")])
def test_compute_mean_is_caffes_file_byte_for_byte(golden, tmp_path, db, mean):
    out = tmp_path / "mean.binaryproto"
    write_blobproto(out, compute_mean(str(golden / db)))
    assert out.read_bytes() == (golden / mean).read_bytes()


def test_mean_of_an_image_list(golden):
    mean = compute_mean(str(golden / "list.txt"), root_folder=f"{golden}/images/",
                        resize_height=32, resize_width=32)
    np.testing.assert_array_equal(mean, read_blobproto(golden / "mean_color32.binaryproto")[0])


def test_many_readers_share_one_database(golden):
    a, b = open_db(golden / "color32_leveldb"), open_db(golden / "color32_leveldb", "leveldb")
    assert a.keys() == b.keys() and len(a) == 30
    a.close()
    assert b.get(b.keys()[3]) == records(golden / "color32_lmdb")[3][1]
    b.close()
    with open_db(golden / "color32_leveldb") as c:   # reopens after every reader closed
        assert len(c) == 30


def test_writer_is_atomic_and_refuses_existing(tmp_path):
    target = tmp_path / "db"
    with pytest.raises(RuntimeError):
        with DBWriter(target, "lmdb") as w:
            w.put("a", b"1")
            raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(tmp_path) == []
    with DBWriter(target, "lmdb") as w:
        for i in range(2500):                       # crosses commits and LMDB map growth
            w.put(f"{i:08d}", bytes(20000))
    assert len(records(target)) == 2500
    with pytest.raises(DataError, match="already exists"):
        DBWriter(target, "lmdb")
    with DBWriter(target, "leveldb", overwrite=True) as w:
        w.put("x", b"y")
    assert detect_backend(target) == "leveldb" and records(target) == [(b"x", b"y")]


def test_failed_conversion_leaves_nothing(golden, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("tshirt_top/00001.png 0\nnope.png 1\n")
    out = tmp_path / "db"
    report = convert_imageset(f"{golden}/images/", str(lst), str(out))
    assert report.written == 1 and "list.txt:2" in report.skipped[0]
    assert [k for k, _ in records(out)] == [b"00000000_tshirt_top/00001.png"]
    lst.write_text("nope.png 1\n")
    with pytest.raises(DataError, match="no image could be read"):
        convert_imageset(f"{golden}/images/", str(lst), str(tmp_path / "db2"))
    assert not (tmp_path / "db2").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_skipped_image_still_uses_its_index(golden, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("missing.png 0\ntshirt_top/00001.png 0\n")
    convert_imageset(f"{golden}/images/", str(lst), str(tmp_path / "db"))
    assert [k for k, _ in records(tmp_path / "db")] == [b"00000001_tshirt_top/00001.png"]


@pytest.mark.parametrize("content, message", [
    (None, "list file does not exist"),
    ("tshirt_top/00001.png zero\n", r"list.txt:1: label 'zero' is not an integer"),
    ("\ntshirt_top/00001.png\n", r"list.txt:2: expected 'relative/path label'"),
])
def test_bad_list_files(golden, tmp_path, content, message):
    lst = tmp_path / "list.txt"
    if content is not None:
        lst.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        convert_imageset(f"{golden}/images/", str(lst), str(tmp_path / "db"))
    assert "\n" not in str(info.value)


def test_corrupt_and_missing_images_are_named(golden, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    shutil.copy(golden / "images" / "bag" / "00023.png", tmp_path / "good.png")
    lst = tmp_path / "list.txt"
    lst.write_text("bad.png 0\nmissing.png 1\ngood.png 8\n")
    report = convert_imageset(f"{tmp_path}/", str(lst), str(tmp_path / "db"))
    assert report.written == 1
    assert report.skipped[0].endswith("list.txt:1: image '" + f"{tmp_path}/bad.png' could not "
                                      "be decoded (corrupt or not an image)")
    assert report.skipped[1].endswith("list.txt:2: image '" + f"{tmp_path}/missing.png' does "
                                      "not exist")


def test_check_size(golden, tmp_path):
    import cv2
    shutil.copytree(golden / "images", tmp_path / "images")
    cv2.imwrite(str(tmp_path / "images" / "big.png"), np.zeros((30, 30), np.uint8))
    lst = tmp_path / "list.txt"
    lst.write_text("tshirt_top/00001.png 0\nbig.png 1\n")
    with pytest.raises(DataError, match=r"list.txt:2: .*--check_size"):
        convert_imageset(f"{tmp_path}/images/", str(lst), str(tmp_path / "db"), check_size=True)
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "database does not exist"),
    (lambda p: p.mkdir(), "not an LMDB or LevelDB database"),
    (lambda p: p.write_text("x"), "not an LMDB or LevelDB database"),
])
def test_bad_database_paths(tmp_path, make, message):
    path = tmp_path / "db"
    make(path)
    with pytest.raises(DataError, match=message):
        open_db(path)
    with pytest.raises(DataError, match=message):
        compute_mean(str(path)) if path.is_dir() or not path.exists() else open_db(path)


def test_backend_mismatch_says_how_to_fix(golden):
    with pytest.raises(DataError, match="is a lmdb database but backend is leveldb"):
        open_db(golden / "color32_lmdb", 0)


class _Dataset:
    """A script's object that keeps the database it wrote open (an attribute, not a local)."""

    def __init__(self, db):
        self.db = db


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_a_database_the_script_still_has_open_is_read_through_its_handle(tmp_path, backend):
    """py-lmdb 2.0+ and LevelDB refuse a second open in one process; Caffe's readers did not.
    A reader shares the script's own open handle, leaves it open, and opens its own once the
    script has closed it."""
    path = str(tmp_path / f"db_{backend}")
    records = {f"{i:08d}".encode(): f"value {i}".encode() for i in range(5)}
    if backend == "lmdb":
        import lmdb
        held = _Dataset(lmdb.open(path, map_size=1 << 22))
        with held.db.begin(write=True) as txn:
            for k, v in records.items():
                txn.put(k, v)
    else:
        import plyvel
        held = _Dataset(plyvel.DB(path, create_if_missing=True))
        for k, v in records.items():
            held.db.put(k, v)
    with open_db(path, backend) as reader:
        assert reader.keys() == sorted(records)
        assert reader.get_many(list(records)) == list(records.values())
    if backend == "lmdb":                      # still open, still the script's
        with held.db.begin() as txn:
            assert txn.get(b"00000003") == b"value 3"
    else:
        assert held.db.get(b"00000003") == b"value 3"
    held.db.close()
    with open_db(path, backend) as reader:    # its own handle now
        assert dict(reader.items()) == records
