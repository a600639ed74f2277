"""Score a job's bundle on a labelled folder under the data root (``caffe score`` in a child
process): accuracy, per-class precision/recall, the confusion matrix and the worst mistakes.

Each scoring is kept in ``<job>/scores/<n>/`` (score.json, confusion.png, mistakes.png).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from caffe_compat.dashboard.safety import Refused, check_folder_links, contained
from caffe_compat.dashboard.settings import Settings
from caffe_compat.dashboard.workers import CAFFE, child_env, last_error

PICTURES = {"confusion.png", "mistakes.png"}
TIMEOUT_SECONDS = 1800


def scores_dir(settings: Settings, job: int) -> Path:
    return settings.folder("jobs", job) / "scores"


def score(settings: Settings, job: int, bundle: Path, folder_text: str) -> dict:
    """Run ``caffe score`` on ``folder_text`` (inside the data root); its score.json."""
    folder = contained(settings.data_root, folder_text, "folder")
    if not folder.is_dir():
        raise Refused(400, f"folder '{folder_text}' is a file, not a folder of class folders")
    check_folder_links(folder, settings.data_root)
    if not (bundle / "weights.caffemodel").is_file():
        raise Refused(409, f"{bundle}: the bundle has no weights.caffemodel")
    root = scores_dir(settings, job)
    root.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    out = root / str(number)
    out.mkdir()
    log = out / "score.log"
    with open(log, "wb") as stream:
        try:
            code = subprocess.run(CAFFE + ["score", str(folder), "--bundle", str(bundle),
                                           "--out", str(out)], stdout=stream,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=child_env(settings), timeout=TIMEOUT_SECONDS).returncode
        except subprocess.TimeoutExpired:
            raise Refused(408, f"scoring took over {TIMEOUT_SECONDS} s; score a smaller "
                               "folder") from None
    if code != 0:
        raise Refused(400, last_error(log))
    summary = json.loads((out / "score.json").read_text(encoding="utf-8"))
    summary["number"] = number
    summary["files"] = {name: f"/api/jobs/{job}/scores/{number}/{name}"
                        for name in sorted(PICTURES) if (out / name).is_file()}
    return summary


def picture(settings: Settings, job: int, number: int, name: str) -> Path:
    path = scores_dir(settings, job) / str(number) / name
    if name not in PICTURES or not path.is_file():
        raise Refused(404, f"job {job} has no scoring {number} picture '{name}'")
    return path


__all__ = ["score", "picture", "scores_dir"]
