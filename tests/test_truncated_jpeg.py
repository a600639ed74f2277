"""A truncated JPEG: read as Caffe reads it (the missing part grey), reported as one warning
line naming the file, never as libjpeg's raw "Premature end of JPEG file" on stderr."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from caffe_compat.formats.c_stderr import c_stderr_lines
from caffe_compat.formats.image_header import jpeg_is_truncated

REPO = Path(__file__).resolve().parent.parent


def _jpeg(progressive: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((96, 80, 3)) * 255).astype(np.uint8), (5, 5), 0)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else []
    return cv2.imencode(".jpg", img, params)[1].tobytes()


def _run(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_convert_imageset_reports_a_truncated_jpeg_in_one_line_naming_it(tmp_path):
    data = _jpeg()
    (tmp_path / "whole.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "list.txt").write_text("whole.jpg 0\ncut.jpg 1\n")
    done = _run(["-c", "import sys; from caffe_compat.commands.convert_imageset import main; "
                       "sys.exit(main())", str(tmp_path) + "/", "list.txt", "out_lmdb"], tmp_path)
    assert done.returncode == 0, done.stderr[-800:]
    lines = done.stderr.splitlines()
    assert not [line for line in lines if line.startswith("Premature end")], done.stderr
    about = [line for line in lines if "cut.jpg" in line]
    assert len(about) == 1 and "list.txt:2: image" in about[0], done.stderr
    assert "truncated JPEG" in about[0] and "Premature end of JPEG file" in about[0]
    assert "2 records" in done.stdout                # read as Caffe reads it, not skipped


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_reads_like_imread_with_the_rest_grey(tmp_path, progressive):
    from caffe_compat.formats.images import read_image
    data = _jpeg(progressive)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    img = read_image(str(path))
    with c_stderr_lines(re.compile(".")):      # the reference imread's line is not ours
        reference = cv2.imread(str(path))
    assert np.array_equal(img, reference)
    if not progressive:                          # sequential: the bottom rows never arrived
        assert np.all(np.abs(img[-4:].astype(int) - 128) <= 1)


@pytest.mark.parametrize("progressive", [False, True])
def test_truncation_is_detected_exactly_where_libjpeg_complains(tmp_path, progressive):
    """Every cut of a JPEG (and the whole file, and trailing bytes after it) is classified
    as libjpeg classifies it: a warning on stderr exactly when the detector says truncated."""
    data = _jpeg(progressive)
    cuts = {n: data[:n] for n in range(4, len(data), max(1, len(data) // 25))}
    cuts.update({-1: data[:-1], len(data): data, len(data) + 9: data + b"\0" * 9})
    script = ("import sys, cv2\nfor p in sys.argv[1:]:\n"
              "    print('@' + p, file=sys.stderr, flush=True); cv2.imread(p)\n")
    paths = []
    for n, cut in cuts.items():
        paths.append(tmp_path / f"c{n}.jpg")
        paths[-1].write_bytes(cut)
    stderr = _run(["-c", script, *map(str, paths)], tmp_path).stderr
    printed = {}
    for chunk in stderr.split("@")[1:]:
        name, _, said = chunk.partition("\n")
        printed[name] = bool(said.strip())
    for path in paths:
        assert printed[str(path)] == jpeg_is_truncated(path.read_bytes()), path.name
    assert any(printed.values()) and not all(printed.values())


def test_held_back_stderr_passes_other_writers_lines_on(capfd):
    with c_stderr_lines(re.compile("libjpeg says")) as said:
        os.write(2, b"libjpeg says hello\n")
        os.write(2, b"another thread's log line\n")
    assert said == ["libjpeg says hello"]
    assert capfd.readouterr().err == "another thread's log line\n"
