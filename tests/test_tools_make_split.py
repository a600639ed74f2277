"""tools/make_split.py: the paper's 40/10 per-class split lists."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from caffe_compat.data import DataError, read_image_list
from caffe_compat.data.split import make_split
from tool_utils import load_tool

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "data" / "fashion50"


@pytest.fixture
def images(tmp_path) -> Path:
    dst = tmp_path / "data" / "fashion50"
    shutil.copytree(FASHION, dst, ignore=shutil.ignore_patterns("*.txt", "*.md"))
    (dst / "labels.txt").write_text((FASHION / "labels.txt").read_text())
    return dst


def test_default_is_40_10_per_class_in_the_fashion_mnist_label_order(images, monkeypatch):
    tool = load_tool("make_split")
    from caffe_compat.commands import make_split as command
    monkeypatch.setattr(command, "repo_root", lambda _file: images.parents[1])
    assert tool.main([]) == 0
    train, test = read_image_list(images / "train.txt"), read_image_list(images / "test.txt")
    labels = (images / "labels.txt").read_text().split()
    assert labels[0] == "tshirt_top" and labels[9] == "ankle_boot"
    for entries, per_class in ((train, 40), (test, 10)):
        assert len(entries) == 10 * per_class
        for e in entries:
            assert e.path.split("/")[0] == labels[e.label] and (images / e.path).is_file()
        assert sorted(e.label for e in entries) == sorted(list(range(10)) * per_class)
    assert not {e.path for e in train} & {e.path for e in test}
    assert [e.label for e in train[:10]] != sorted(e.label for e in train[:10])  # shuffled
    # the committed lists are this default split
    assert (FASHION / "train.txt").read_text() == (images / "train.txt").read_text()
    assert (FASHION / "test.txt").read_text() == (images / "test.txt").read_text()


def test_seed_changes_the_draw_reproducibly(images, tmp_path):
    a = make_split(images, tmp_path / "a", seed=1)
    b = make_split(images, tmp_path / "b", seed=1)
    c = make_split(images, tmp_path / "c", seed=2)
    assert a["train"].read_text() == b["train"].read_text() != c["train"].read_text()


def test_too_few_images_names_the_classes(images, capsys):
    tool = load_tool("make_split")
    for f in sorted((images / "bag").iterdir())[5:]:
        f.unlink()
    assert tool.main([str(images), "--train-per-class", "4", "--test-per-class", "2"]) == 1
    assert capsys.readouterr().err == ("error: too few images for 4+2 per class: bag (5)\n")
    assert tool.main([str(images), "--train-per-class", "3", "--test-per-class", "2"]) == 0


def test_label_order(images, tmp_path):
    (images / "labels.txt").unlink()
    make_split(images, tmp_path, 1, 1)
    assert (tmp_path / "labels.txt").read_text().split()[:2] == ["ankle_boot", "bag"]
    (tmp_path / "order.txt").write_text("bag\n")
    with pytest.raises(DataError, match="are not listed"):
        make_split(images, tmp_path, 1, 1, labels_file=tmp_path / "order.txt")
    with pytest.raises(DataError, match="image folder does not exist"):
        make_split(tmp_path / "nowhere", tmp_path, 1, 1)
