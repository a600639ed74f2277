"""``caffe dataset``: class folders → stratified split, LMDB/LevelDB, mean, contact sheet,
dataset.json; unreadable files skipped and listed; bad options refused in one line."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from caffe_compat.commands.dataset import build_dataset
from caffe_compat.data.convert import compute_mean
from caffe_compat.data.db import open_db
from caffe_compat.formats.blob_io import read_blobproto
from caffe_compat.formats.datum import decode_datum
from fit_utils import caffe, photo_folder


@pytest.fixture
def photos(tmp_path):
    folder = photo_folder(tmp_path / "photos", per_class=10)
    (folder / "bag" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "sandal" / "notes.txt").write_text("hello")
    (folder / "stray.png").write_bytes((folder / "bag" / "broken.jpg").read_bytes())
    (folder / ".hidden").mkdir()
    return folder


def _records(db) -> list[tuple[str, np.ndarray, int]]:
    with open_db(db) as reader:
        return [(k.decode(), *decode_datum(v)[:2]) for k, v in reader.items()]


def test_build_dataset_writes_every_piece(photos, tmp_path):
    seen = []
    out = tmp_path / "ds"
    summary = build_dataset(photos, out, resize=(40, 36), val_percent=20, seed=3,
                            progress=lambda stage, done, total: seen.append(stage))
    assert summary["classes"] == ["bag", "sandal", "trouser"]
    assert summary["counts"] == {c: {"train": 8, "val": 2} for c in summary["classes"]}
    reasons = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(reasons) == {"bag/broken.jpg", "sandal/notes.txt", "stray.png"}
    assert "decoded" in reasons["bag/broken.jpg"] and "not an image" in reasons["sandal/notes.txt"]
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert (out / "labels.txt").read_text() == "bag\nsandal\ntrouser\n"
    train = [line.rsplit(" ", 1) for line in (out / "train.txt").read_text().splitlines()]
    val = [line.rsplit(" ", 1) for line in (out / "val.txt").read_text().splitlines()]
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert all(summary["classes"][int(label)] == path.split("/")[0] for path, label in train + val)
    records = _records(out / "val_lmdb")
    assert [key.split("_", 1)[1] for key, _, _ in records] == [p for p, _ in val]
    assert all(img.shape == (3, 40, 36) for _, img, _ in records)
    first = cv2.resize(cv2.imread(str(photos / val[0][0])), (36, 40))
    assert np.array_equal(records[0][1], first.transpose(2, 0, 1))   # convert_imageset's bytes
    mean = read_blobproto(out / "mean.binaryproto")[0]
    assert np.array_equal(mean, compute_mean(str(out / "train_lmdb")))
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 3 * 40
    assert {"scan", "train_db", "val_db", "mean", "contact_sheet"} <= set(seen)


def test_per_class_counts_seed_and_leveldb(photos, tmp_path):
    a = build_dataset(photos, tmp_path / "a", resize=(20, 20), per_class="5/3", seed=1,
                      backend="leveldb")
    b = build_dataset(photos, tmp_path / "b", resize=(20, 20), per_class=(5, 3), seed=1,
                      backend="leveldb")
    c = build_dataset(photos, tmp_path / "c", resize=(20, 20), per_class="5/3", seed=2)
    assert a["counts"]["bag"] == {"train": 5, "val": 3} and a["train_count"] == 15
    assert (tmp_path / "a" / "train_leveldb").is_dir() and a["backend"] == "leveldb"
    assert (tmp_path / "a" / "train.txt").read_text() == (tmp_path / "b" / "train.txt").read_text()
    assert (tmp_path / "a" / "train.txt").read_text() != (tmp_path / "c" / "train.txt").read_text()
    assert len(_records(tmp_path / "a" / "train_leveldb")) == 15


def test_cli_prints_summary(photos, tmp_path, capsys):
    assert caffe("dataset", photos, tmp_path / "ds", "--resize", 24, 24, "--val-percent",
                 30) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "skipped bag/broken.jpg" in out
    summary = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert summary["split"] == {"val_percent": 30.0} and summary["resize"] == [24, 24]
    assert summary["command"].startswith("caffe dataset")


@pytest.mark.parametrize("argv, needle", [
    (["--per-class", "40/10"], "too few images for 40/10 per class: bag (10)"),
    (["--per-class", "forty"], "expected TRAIN/VAL counts"),
    (["--val-percent", "100"], "between 0 and 100"),
    (["--resize", "0", "10"], "at least 1"),
])
def test_bad_options_one_line(photos, tmp_path, capsys, argv, needle):
    assert caffe("dataset", photos, tmp_path / "ds", *argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_folder_and_single_image_class(tmp_path, capsys):
    assert caffe("dataset", tmp_path / "nowhere", tmp_path / "ds") == 1
    assert "image folder does not exist" in capsys.readouterr().err
    folder = photo_folder(tmp_path / "p", classes=("bag",), per_class=1)
    photo_folder(folder, classes=("sandal",), per_class=4)
    assert caffe("dataset", folder, tmp_path / "ds") == 1
    err = capsys.readouterr().err
    assert "at least 2 images" in err and "bag (1)" in err


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "x.txt").write_text("x")
    assert caffe("dataset", tmp_path / "empty", tmp_path / "ds") == 1
    assert "no class sub-folders with readable images" in capsys.readouterr().err


def test_output_inside_the_folder_is_not_a_class(photos):
    build_dataset(photos, photos / "built", resize=(16, 16))
    again = build_dataset(photos, photos / "built", resize=(16, 16))
    assert again["classes"] == ["bag", "sandal", "trouser"]
    assert not any(item["path"].startswith("built/") for item in again["skipped"])


def test_each_photo_is_decoded_once(photos, tmp_path, monkeypatch):
    """The scan's decode is the one written to the databases (the contact sheet still reads
    its few thumbnails' files); the scratch database of decoded photos is gone afterwards."""
    from collections import Counter
    from caffe_compat.formats import images
    reads, real = Counter(), images.read_image
    monkeypatch.setattr(images, "read_image", lambda path, *a, **k: reads.update([path])
                        or real(path, *a, **k))
    out = tmp_path / "ds"
    summary = build_dataset(photos, out, resize=(20, 20), per_class="6/4")
    sheet = [line.split()[0] for line in (out / "train.txt").read_text().splitlines()]
    sheet = {p for c in summary["classes"] for p in [q for q in sheet if q.startswith(c + "/")][:8]}
    for path, count in reads.items():
        rel = path[len(str(photos)) + 1:]
        assert count == 1 + (rel in sheet), (rel, count)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["contact_sheet.png", "dataset.json", "labels.txt", "mean.binaryproto", "train.txt",
         "train_lmdb", "val.txt", "val_lmdb"])


def test_a_refused_data_set_leaves_no_folder(photos, tmp_path):
    with pytest.raises(Exception, match="too few images"):
        build_dataset(photos, tmp_path / "ds", per_class="40/10")
    assert not (tmp_path / "ds").exists()
