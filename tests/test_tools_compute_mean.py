"""tools/compute_mean.py: Caffe's mean files, image lists, defaults and errors."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tool_utils import load_tool

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "goldens" / "data"


def test_script_reproduces_caffes_mean_file(tmp_path):
    shutil.copytree(GOLDEN / "gray_lmdb", tmp_path / "gray_lmdb")
    out = tmp_path / "mean.binaryproto"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "compute_mean.py"),
                          str(tmp_path / "gray_lmdb"), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == (GOLDEN / "mean_gray.binaryproto").read_bytes()
    assert "mean_value channel [0]: 74.1008" in run.stdout


def test_leveldb_and_list_inputs(tmp_path, capsys):
    tool = load_tool("compute_mean")
    shutil.copytree(GOLDEN / "color32_leveldb", tmp_path / "ldb")
    assert tool.main(["--backend=leveldb", str(tmp_path / "ldb"), str(tmp_path / "a")]) == 0
    assert tool.main([str(GOLDEN / "list.txt"), str(tmp_path / "b"), "--root_folder",
                      f"{GOLDEN}/images/", "--resize_height=32", "--resize_width=32"]) == 0
    golden = (GOLDEN / "mean_color32.binaryproto").read_bytes()
    assert (tmp_path / "a").read_bytes() == golden == (tmp_path / "b").read_bytes()
    assert tool.main([str(GOLDEN / "list.txt"), f"-root_folder={GOLDEN}/images/"]) == 0
    # (no output file: print only)
    assert "Number of channels: 3" in capsys.readouterr().out


def test_errors(tmp_path, capsys):
    tool = load_tool("compute_mean")
    assert tool.main([str(tmp_path / "none"), str(tmp_path / "m")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path}/none: input database or list does "
                                       "not exist\n")
    (tmp_path / "empty").mkdir()
    assert tool.main([str(tmp_path / "empty")]) == 1
    assert "not an LMDB or LevelDB database" in capsys.readouterr().err
    shutil.copytree(GOLDEN / "gray_lmdb", tmp_path / "g")
    assert tool.main(["--backend", "leveldb", str(tmp_path / "g")]) == 1
    assert "set backend: LMDB" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_no_arguments_builds_what_is_missing(tmp_path, monkeypatch):
    tool = load_tool("compute_mean")
    shutil.copytree(ROOT / "data" / "fashion50", tmp_path / "data" / "fashion50",
                    ignore=shutil.ignore_patterns("train.txt", "test.txt"))
    monkeypatch.setattr(tool, "repo_root", lambda _file: tmp_path)
    monkeypatch.setattr("experiments.defaults.DEFAULT_SIZES", (72, 32))
    assert tool.main([]) == 0
    for name in ("fashion50/train.txt", "fashion50/test.txt", "fashion50_lmdb/train",
                 "fashion50_lmdb/test", "fashion50_lmdb/mean.binaryproto",
                 "fashion50_lmdb_32/mean.binaryproto"):
        assert (tmp_path / "data" / name).exists(), name
