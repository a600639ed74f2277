"""The bundle a job classifies and scores with, and that its page offers for download.

A job that ran to its end has the bundle ``caffe fit`` wrote. A stopped or interrupted job
(stop = snapshot) has none, but its newest snapshot is a trained model too: it gets a bundle
made from that snapshot as ``caffe bundle`` makes one (the run's solver and train_val, the
data set's labels and mean), kept in ``<job>/snapshot_bundles/<iteration>`` until a newer
snapshot replaces it.
"""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

from caffe_compat.commands.common import CliError
from caffe_compat.dashboard import datasets
from caffe_compat.dashboard.jobs import bundle_dir, newest_snapshot, run_dir
from caffe_compat.dashboard.safety import Refused
from caffe_compat.dashboard.settings import Settings
from caffe_compat.formats.errors import CaffeCompatError

WEIGHTS = "weights.caffemodel"
_LOCK = threading.Lock()            # one snapshot bundle written at a time


def usable(settings: Settings, record: dict) -> tuple[Path, str]:
    """(bundle folder, which weights it holds) for a job record; 409 when it has none."""
    job = record["id"]
    final = bundle_dir(settings, job)
    if (final / WEIGHTS).is_file():
        return final, "final weights"
    snapshot = newest_snapshot(settings, job)
    if snapshot is None:
        raise Refused(409, f"job {job} has no trained weights yet (a bundle is written when "
                           "training ends; a stopped job classifies with its last snapshot)")
    iteration, weights = snapshot
    folder = settings.folder("jobs", job) / "snapshot_bundles" / str(iteration)
    with _LOCK:
        if not (folder / WEIGHTS).is_file():
            _write(settings, record, weights, folder)
            for older in folder.parent.iterdir():
                if older != folder:
                    shutil.rmtree(older, ignore_errors=True)
    return folder, f"snapshot of iteration {iteration}"


def _write(settings: Settings, record: dict, weights: Path, folder: Path) -> None:
    from caffe_compat.commands.bundle import bundle_from_solver
    summary = datasets.summary_of(settings, record["options"]["dataset"])
    data = datasets.data_dir(settings, record["options"]["dataset"])
    try:
        bundle_from_solver(str(run_dir(settings, record["id"]) / "solver.prototxt"),
                           str(weights), folder,
                           labels_file=str(data / summary["files"]["labels"]),
                           info={"name": f"job {record['id']} ({record['name']})",
                                 "command": f"dashboard: job {record['id']}, {weights.name}"},
                           landmark_names=(summary.get("landmarks") or {}).get("names"))
    except (CaffeCompatError, CliError, OSError, ValueError) as exc:
        raise Refused(409, f"job {record['id']}: cannot make a bundle of {weights.name}: "
                           f"{exc}") from None


__all__ = ["usable"]
