"""Checks and resume logic for ``tools/train.py``, kept apart from the command (issue 12).

- ``check_cpu_procs``: ``--cpu-procs`` must be a positive process count;
- ``resolve_auto_snapshot``: ``--snapshot auto`` becomes the newest complete snapshot under
  the solver's ``snapshot_prefix`` (or a fresh start when there is none), after removing the
  temporaries a killed writer left next to the snapshots.
"""
from __future__ import annotations

import copy
import logging
import os

from caffe_compat.commands.common import CliError
from caffe_compat.engine.solver.params import read_solver_param
from caffe_compat.engine.solver.snapshot import latest_snapshot
from caffe_compat.formats.atomic import remove_stale_temporaries

log = logging.getLogger(__name__)
AUTO = "auto"
MAX_CPU_PROCS = 1024


def check_cpu_procs(value) -> int:
    """``--cpu-procs N``: 1 ≤ N ≤ MAX_CPU_PROCS; CliError otherwise."""
    if value is None:
        return 1
    if not isinstance(value, int) or not 1 <= value <= MAX_CPU_PROCS:
        raise CliError(f"--cpu-procs must be a process count from 1 to {MAX_CPU_PROCS} "
                       f"(got {value})")
    return value


def clean_snapshot_folder(prefix: str) -> list:
    """Remove stale temporaries (``.<name>.tmp-<pid>-…`` of dead writers) beside the
    snapshots of ``prefix``; returns what was removed."""
    folder = os.path.dirname(prefix) or "."
    stem = os.path.basename(prefix)
    removed = remove_stale_temporaries(folder, stem)
    for path in removed:
        log.warning("removed %s, left by a writer that was killed", path)
    return removed


def resolve_auto_snapshot(snapshot: str | None, prefix: str) -> str | None:
    """``snapshot`` as given, or — for ``auto`` — the newest complete solverstate under
    ``prefix`` (None: nothing to resume, start fresh)."""
    if snapshot != AUTO:
        return snapshot
    clean_snapshot_folder(prefix)
    found = latest_snapshot(prefix)
    log.info("--snapshot auto: %s", f"resuming from {found}" if found else
             f"no complete snapshot under '{prefix}', starting fresh")
    return found


def prepare_train_args(args):
    """A copy of the train command's ``args`` with --cpu-procs checked and --snapshot auto
    resolved (needs --solver; without one the command's own check reports it)."""
    check_cpu_procs(getattr(args, "cpu_procs", 1))
    if getattr(args, "snapshot", None) != AUTO:
        return args
    if not args.solver:
        raise CliError("--snapshot auto needs --solver")
    args = copy.copy(args)
    args.snapshot = resolve_auto_snapshot(AUTO, read_solver_param(args.solver).snapshot_prefix)
    return args
