"""Test-wide settings.

The suite runs many tiny nets; with two OpenMP threads on a loaded two-core machine their
steps spend most of the time in thread hand-off, so tests use one thread. Benchmarks do not.
"""
import torch

torch.set_num_threads(1)


# The goldens are real Caffe's output and must never change. Opening a LevelDB in place
# rewrites its files, so the session fails if any test touched them (tests copy databases).
import hashlib
from pathlib import Path

import pytest

_GOLDENS = Path(__file__).parent / "goldens"


def _digest() -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in _GOLDENS.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(_GOLDENS)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def pytest_sessionstart(session):
    session.config._goldens_digest = _digest()


def pytest_sessionfinish(session, exitstatus):
    if _digest() != session.config._goldens_digest:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nERROR: a test modified tests/goldens (open databases on a copy)")
