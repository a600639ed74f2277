"""Progress of a data set build (``caffe dataset``): records done / total and the ETA, as
progress lines in the log and, with ``--status FILE``, a JSON file a dashboard reads.

The build checks every image (stage ``scan``: each photo is decoded and resized once), then
writes the training and validation records (``train_db``, ``val_db``), computes the mean and
draws the contact sheet. The ETA extrapolates each stage's own pace: while the scan runs,
the images left at the scan's pace and as many records again at that pace (an upper bound:
writing a record decodes nothing); once records are written, their own pace.
"""
from __future__ import annotations

import json
import time

from caffe_compat.formats import glog
from caffe_compat.formats.atomic import write_text

WRITE_EVERY = 0.5              # seconds between status file writes
LOG_STEPS = 10                 # progress lines per stage (every 10%)
LOG_GAP = 2.0                  # seconds between two lines of a stage (a fast build: few)
STAGES = ("scan", "split", "train_db", "val_db", "mean", "contact_sheet")


class BuildProgress:
    """``progress(stage, done, total)`` for ``build_dataset``; ``state()`` is the status."""

    def __init__(self, status_file=None, log_lines: bool = True, clock=time.monotonic):
        self.status_file, self.log_lines, self.clock = status_file, log_lines, clock
        self.started = clock()
        self.stage, self.stage_done, self.stage_total = "scan", 0, 0
        self.images_total = 0
        self.records_train = self.records_total = None
        self.records_done = {"train_db": 0, "val_db": 0}
        self._written = -WRITE_EVERY
        self._logged_step = {}
        self._logged_at = self.started
        self._records_started = None       # (time, records) when writing began
        self._scan_seconds = 0.0           # from the start to the last image checked

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "split":
            self.records_train, self.records_total = done, total
        else:
            self.stage, self.stage_done, self.stage_total = stage, done, total
        if stage == "scan":
            self.images_total = total
            self._scan_seconds = self.clock() - self.started
        elif stage in self.records_done:
            self.records_done[stage] = done
            if self._records_started is None and done:      # the pace counts from here
                self._records_started = (self.clock(), sum(self.records_done.values()))
        self._log(stage, done, total)
        if self.clock() - self._written >= WRITE_EVERY or done == total:
            self._write()

    def state(self, finished: bool = False) -> dict:
        elapsed = self.clock() - self.started
        records = sum(self.records_done.values())
        checked = self.stage_done if self.stage == "scan" else self.images_total
        eta = None
        if finished:
            pass
        elif self._records_started is not None and self.records_total:
            since, before = self._records_started
            written = records - before
            if written > 0:
                eta = (self.clock() - since) / written * max(0, self.records_total - records)
        elif checked and self._scan_seconds:
            per_image = self._scan_seconds / checked
            records_left = self.records_total or self.images_total
            eta = per_image * (self.images_total - checked + records_left)
        return {"stage": "done" if finished else self.stage, "stage_done": self.stage_done,
                "stage_total": self.stage_total, "images_checked": checked,
                "images_total": self.images_total, "records_done": records,
                "records_total": self.records_total,
                "elapsed_seconds": round(elapsed, 2),
                "eta_seconds": None if eta is None else round(eta, 1)}

    def finish(self) -> None:
        self._write(finished=True)

    def _write(self, finished: bool = False) -> None:
        self._written = self.clock()
        if self.status_file:
            write_text(self.status_file, json.dumps(self.state(finished)) + "\n")

    def _log(self, stage: str, done: int, total: int) -> None:
        """A line at each tenth of a stage that counts (scan and the databases), at most one
        every ``LOG_GAP`` seconds (a build of a few seconds stays quiet)."""
        if not self.log_lines or stage not in ("scan", "train_db", "val_db") or total <= 0:
            return
        step = done * LOG_STEPS // total
        quiet = self.clock() - self._logged_at < LOG_GAP
        if step == 0 or step == self._logged_step.get(stage, -1) or quiet:
            return
        self._logged_step[stage], self._logged_at = step, self.clock()
        state = self.state()
        what = "images checked" if stage == "scan" else f"{stage[:-3]} records"
        eta = state["eta_seconds"]
        glog.info(f"Progress: {stage} {done}/{total} {what} ({100 * done / total:.0f}%), "
                  f"elapsed {state['elapsed_seconds']:.1f} s, ETA "
                  f"{'unknown' if eta is None else f'{eta:.1f} s'}", "dataset")


def read_status(path) -> dict | None:
    """A status file's content, or None while there is none (or it is being replaced)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


__all__ = ["BuildProgress", "read_status", "STAGES"]
