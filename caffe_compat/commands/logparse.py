"""Read a Caffe training log (ours, or real Caffe's) into train and test rows.

Rows, as Caffe's ``tools/extra/parse_log.py`` builds them:

- a **train row** per displayed iteration: ``iter``, ``seconds`` since the ``Solving`` line
  (at the row's first output line, as Caffe's parser counts),
  ``lr`` (from that iteration's ``Iteration N, lr = X`` line), the smoothed ``loss`` of the
  ``Iteration N, loss = X`` / ``Iteration N (x iter/s, ...), loss = X`` line, and the
  ``Train net output #k: name = value`` values in ``outputs``;
- a **test row** per ``Iteration N, Testing net (#i)`` block: ``iter``, ``seconds``, ``lr``
  (in effect at that iteration), ``net`` = i and the ``Test net output`` values.

Accepted line prefixes: glog's ``I<MMDD> HH:MM:SS.uuuuuu tid file:line] `` and newer glog's
``I<YYYYMMDD> ...``. Lines without a prefix (a multi-line message's continuation) are ignored.
A month-and-day prefix takes its year from the file's modification time (Caffe's
extract_seconds.py uses the creation time), stepping to the next year when the month goes
back. Improvements over Caffe's parser, which assigns each row the last lr seen (one display
interval late): the lr is the one logged for the row's own iteration; several test nets give
separate rows; ``nan``/``inf`` values parse; resumed logs (iterations going back) are kept in
order, and ``latest()`` keeps the last row of each iteration.

Runs: ``caffe train`` appends to ``<prefix>.log``, opening each run with glog's ``Log file
created at:`` header. A run that resumes a snapshot (``Resuming from`` / ``Restoring previous
solver status from``) continues the run before it; any other run starts a new one. Each row
carries its ``run`` number (0, 1, ... in log order, counting runs that logged rows), so an
unrelated run started over an existing prefix is kept apart from the earlier ones.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

from caffe_compat.formats.atomic import atomic_write

_PREFIX = re.compile(r"^[IWEF](?:(\d{4})(\d{2})(\d{2})|(\d{2})(\d{2})) "
                     r"(\d{2}):(\d{2}):(\d{2})\.(\d{1,6})\s+\d+\s+\S+\] ?(.*)$")
_NUM = r"([-+]?(?:nan|inf|[\d.]+(?:[eE][-+]?\d+)?))"
_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = " + _NUM)
_LR = re.compile(r"Iteration (\d+), lr = " + _NUM)
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = " + _NUM)
_SNAPSHOT = re.compile(r"Snapshotting to (?:binary proto|HDF5) file (\S+)")
_STATE = re.compile(r"Snapshotting solver state to (?:binary proto|HDF5) file (\S+)")
_RESTORE = re.compile(r"(?:Restoring previous solver status from|Resuming from) (\S+)")


@dataclass
class Row:
    """One train or test row; ``outputs`` keeps the log's order (repeated names get _1, _2)."""
    iter: int
    seconds: float
    lr: float = math.nan
    loss: float = math.nan      # train rows: the smoothed loss of the "loss =" line
    net: int = 0                # test rows: which test net
    run: int = 0                # which run of the log (a resumed run continues its run)
    outputs: dict[str, float] = field(default_factory=dict)

    def add_output(self, name: str, value: float) -> None:
        key, k = name, 0
        while key in self.outputs:
            k += 1
            key = f"{name}_{k}"
        self.outputs[key] = value


@dataclass
class LogData:
    train: list[Row] = field(default_factory=list)
    test: list[Row] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)       # .caffemodel paths, in order
    solver_states: list[str] = field(default_factory=list)   # .solverstate paths, in order
    restored_from: list[str] = field(default_factory=list)
    start: datetime.datetime | None = None

    def test_nets(self) -> list[int]:
        return sorted({r.net for r in self.test})

    def runs(self) -> list[int]:
        """The run numbers that logged rows, in order."""
        return sorted({r.run for r in self.train + self.test})

    def latest(self, rows: list[Row], net: int | None = None,
               run: int | None = None) -> list[Row]:
        """Rows sorted by iteration, keeping the last one logged for each (resumed runs);
        only those of test net ``net`` and of run ``run`` when given."""
        by_iter: dict[int, Row] = {}
        for r in rows:
            if (net is None or r.net == net) and (run is None or r.run == run):
                by_iter[r.iter] = r
        return [by_iter[i] for i in sorted(by_iter)]


def _timestamp(match: re.Match, year: int) -> datetime.datetime:
    y, m8, d8, m4, d4, hh, mm, ss, frac = match.groups()[:9]
    year = int(y) if y else year
    month, day = (int(m8), int(d8)) if y else (int(m4), int(d4))
    micro = int(frac.ljust(6, "0"))
    return datetime.datetime(year, month, day, int(hh), int(mm), int(ss), micro)


def parse_lines(lines: Iterable[str], year: int | None = None) -> LogData:
    """Parse log lines (see the module docstring); ``year`` completes ``I<MMDD>`` prefixes."""
    year = year or datetime.date.today().year
    data = LogData()
    train: Row | None = None
    test: Row | None = None
    lr_by_iter: dict[int, float] = {}
    last_lr = math.nan
    last_month = 0
    first_time: datetime.datetime | None = None
    runs = _RunCounter()
    for line in lines:
        m = _PREFIX.match(line.strip())
        if not m:
            runs.see_header(line)
            continue
        if not m.group(1) and int(m.group(4)) < last_month:
            year += 1              # the log ran over new year (month went back)
        last_month = int(m.group(2) or m.group(4))
        try:
            now = _timestamp(m, year)
        except ValueError:
            continue
        first_time = first_time or now
        msg = m.group(10)
        if "Solving" in msg and (data.start is None or runs.starting_new()):
            data.start = now           # a new run's seconds count from its own start
        seconds = (now - (data.start or first_time)).total_seconds()
        if (hit := _LOSS.search(msg)):
            train = Row(int(hit.group(1)), seconds, loss=float(hit.group(2)), run=runs.row())
            data.train.append(train)
        elif (hit := _LR.search(msg)):
            last_lr = lr_by_iter[int(hit.group(1))] = float(hit.group(2))
            if train is not None and train.iter == int(hit.group(1)):
                train.lr = last_lr
        elif (hit := _TESTING.search(msg)):
            test = Row(int(hit.group(1)), seconds, lr=last_lr, net=int(hit.group(2)),
                       run=runs.row())
            data.test.append(test)
        elif (hit := _OUTPUT.search(msg)):
            row = train if hit.group(1) == "Train" else test
            if row is not None:
                if not row.outputs:
                    row.seconds = seconds      # Caffe's parser times a row by its first output
                row.add_output(hit.group(3), float(hit.group(4)))
        elif (hit := _STATE.search(msg)):
            data.solver_states.append(hit.group(1))
        elif (hit := _SNAPSHOT.search(msg)):
            data.snapshots.append(hit.group(1))
        elif (hit := _RESTORE.search(msg)):
            data.restored_from.append(hit.group(1))
            runs.resumed = True
    for r in data.test:        # the rate used by that iteration's update, once it is known
        r.lr = lr_by_iter.get(r.iter, r.lr)
    for rows in (data.train, data.test):
        _fill_lr(rows)
    return data


class _RunCounter:
    """Numbers the runs of an appended log: a glog header opens a run, which becomes a new
    run at its first row unless it restored a snapshot first (then it continues the last)."""

    def __init__(self):
        self.current, self.rows_seen = 0, False
        self.opened, self.resumed = False, False

    def see_header(self, line: str) -> None:
        if line.startswith("Log file created at:"):
            self.opened, self.resumed = True, False

    def starting_new(self) -> bool:
        return self.opened and not self.resumed and self.rows_seen

    def row(self) -> int:
        if self.opened:
            if self.rows_seen and not self.resumed:
                self.current += 1
            self.opened = False
        self.rows_seen = True
        return self.current


def _fill_lr(rows: list[Row]) -> None:
    """Rows without an lr line take the previous known rate; those before the first one take
    the first (Caffe's parse_log.py copies the second row's rate into the first)."""
    known = next((r.lr for r in rows if not math.isnan(r.lr)), math.nan)
    for r in rows:
        if math.isnan(r.lr):
            r.lr = known
        known = r.lr


def parse_log(path: str | os.PathLike) -> LogData:
    """Parse a log file; ``I<MMDD>`` prefixes take the year of the file's modification time."""
    year = datetime.datetime.fromtimestamp(os.path.getmtime(path)).year
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    first_month = next((m.group(2) or m.group(4) for m in map(_PREFIX.match, lines) if m), None)
    last_month = next((m.group(2) or m.group(4) for m in map(_PREFIX.match, reversed(lines))
                       if m), None)
    if first_month and last_month and int(last_month) < int(first_month):
        year -= 1              # written over new year: the file's year is the last line's
    return parse_lines(lines, year)


def _csv_rows(rows: list[Row]) -> tuple[list[str], list[list]]:
    """Caffe's columns: NumIters, Seconds, LearningRate, then every output name."""
    names: list[str] = []
    for r in rows:
        names += [n for n in r.outputs if n not in names]
    table = [[float(r.iter), r.seconds, r.lr] + [r.outputs.get(n, "") for n in names]
             for r in rows if r.outputs]
    return ["NumIters", "Seconds", "LearningRate"] + names, table


def write_csv(path: str, rows: list[Row], delimiter: str = ",") -> bool:
    """Write one CSV as Caffe's parse_log.py does (csv.excel dialect); False when empty."""
    header, table = _csv_rows(rows)
    if not table:
        return False
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, dialect=csv.excel, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(table)
    return True


def save_csv_files(log_path: str, output_dir: str, data: LogData,
                   delimiter: str = ",") -> list[str]:
    """``<log>.train`` and ``<log>.test`` in ``output_dir`` (test net #k>0: ``<log>.test<k>``).

    A log holding several runs (see the module docstring) gives the last run these names and
    each earlier run its own files, ``<log>.run<k>.train`` / ``.test`` (k from 1), so no
    table mixes runs. A table without rows is not written (as in Caffe). Returns the paths
    written.
    """
    base = os.path.join(output_dir, os.path.basename(log_path))
    runs = data.runs() or [0]
    written = []
    for k, run in enumerate(runs, start=1):
        stem = base if run == runs[-1] else f"{base}.run{k}"
        train = [r for r in data.train if r.run == run]
        if write_csv(stem + ".train", train, delimiter):
            written.append(stem + ".train")
        for net in data.test_nets() or [0]:
            path = stem + (".test" if net == 0 else f".test{net}")
            if write_csv(path, [r for r in data.test if r.net == net and r.run == run],
                         delimiter):
                written.append(path)
    return written


__all__ = ["Row", "LogData", "parse_lines", "parse_log", "write_csv", "save_csv_files"]
