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


@pytest.fixture(autouse=True)
def _glog_to_stderr(monkeypatch):
    """Caffe's log lines on stderr for every test, whatever a tool run in-process before it
    switched off (scripts such as reproduce_paper turn the terminal copy off for their run)."""
    from caffe_compat.formats import glog
    previous = glog.stderr_enabled()
    glog.set_stderr(True)
    monkeypatch.setenv("GLOG_minloglevel", "0")
    yield
    glog.set_stderr(previous)
