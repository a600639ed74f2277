"""tools/prepare_fashion_mnist.py (IDX → PNG/LMDB) and tools/prepare_default_data.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.data import open_db, read_image_list
from caffe_compat.formats.datum import decode_datum
from tool_utils import load_tool, write_idx

ROOT = Path(__file__).resolve().parents[1]
IDX = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def tiny_idx(tmp_path) -> Path:
    """Fake IDX files: 30 train and 10 test images, 3 of each class in train."""
    rng = np.random.default_rng(0)
    d = tmp_path / "idx"
    d.mkdir()
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return d


def test_per_class_folders(tiny_idx, tmp_path):
    tool = load_tool("prepare_fashion_mnist")
    out = tmp_path / "out"
    assert tool.main(["--idx-dir", str(tiny_idx), "--out", str(out), "--per-class", "2"]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(files) == 20 and "tshirt_top/00000.png" in files and "tshirt_top/00010.png" in files
    assert (out / "labels.txt").read_text().split()[9] == "ankle_boot"
    assert tool.main(["--idx-dir", str(tiny_idx), "--out", str(out), "--per-class", "4"]) == 1


def test_full_set_as_lists_and_as_lmdb(tiny_idx, tmp_path):
    import cv2
    tool = load_tool("prepare_fashion_mnist")
    out = tmp_path / "full"
    assert tool.main(["--idx-dir", str(tiny_idx), "--out", str(out), "--full"]) == 0
    train = read_image_list(out / "train.txt")
    assert len(train) == 30 and len(read_image_list(out / "test.txt")) == 10
    assert tool.main(["--idx-dir", str(tiny_idx), "--lmdb", str(tmp_path / "db"), "--color",
                      "--resize", "32"]) == 0
    convert = load_tool("convert_imageset")
    assert convert.main(["--resize_height=32", "--resize_width=32", f"{out}/",
                         str(out / "train.txt"), str(tmp_path / "conv")]) == 0
    with open_db(tmp_path / "db" / "train") as a, open_db(tmp_path / "conv") as b:
        assert list(a.items()) == list(b.items())      # same keys and Datums as converting PNGs
    with open_db(tmp_path / "db" / "test") as t:
        img, label, _ = decode_datum(t.first()[1])
    assert img.shape == (3, 32, 32) and label == 0
    assert cv2.imread(str(out / train[0].path)).shape == (28, 28, 3)


def test_missing_idx_says_what_to_install(tmp_path, capsys):
    assert load_tool("prepare_fashion_mnist").main(["--idx-dir", str(tmp_path)]) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.skipif(not IDX.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_embedded_images_are_the_first_50_of_each_class(tmp_path):
    assert load_tool("prepare_fashion_mnist").main(["--out", str(tmp_path)]) == 0
    committed = ROOT / "data" / "fashion50"
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert made == sorted(p.relative_to(committed) for p in committed.rglob("*.png"))
    assert len(made) == 500
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (committed / rel).read_bytes()


def test_prepare_default_data_equals_the_three_commands(tmp_path, monkeypatch):
    def checkout(name):
        dst = tmp_path / name / "data" / "fashion50"
        shutil.copytree(ROOT / "data" / "fashion50", dst,
                        ignore=shutil.ignore_patterns("train.txt", "test.txt"))
        return tmp_path / name

    one, three = checkout("one"), checkout("three")
    monkeypatch.setattr("experiments.defaults.DEFAULT_SIZES", (72, 36))
    prepare = load_tool("prepare_default_data")
    monkeypatch.setattr(prepare, "repo_root", lambda _f: one)
    assert prepare.main([]) == 0
    for name in ("make_split", "convert_imageset", "compute_mean"):
        tool = load_tool(name)
        monkeypatch.setattr(tool, "repo_root", lambda _f: three)
        assert tool.main([]) == 0
    for rel in ("fashion50/train.txt", "fashion50/test.txt", "fashion50_lmdb/mean.binaryproto",
                "fashion50_lmdb_36/mean.binaryproto"):
        assert (one / "data" / rel).read_bytes() == (three / "data" / rel).read_bytes(), rel
    for rel in ("fashion50_lmdb/train", "fashion50_lmdb/test", "fashion50_lmdb_36/train"):
        with open_db(one / "data" / rel) as a, open_db(three / "data" / rel) as b:
            assert list(a.items()) == list(b.items())
