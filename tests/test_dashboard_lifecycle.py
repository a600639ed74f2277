"""The dashboard's worker lifecycle against a real SQLite store: a child's waiter thread that
is still busy when the server shuts down finishes before the store is closed."""
from __future__ import annotations

import threading
import time

import pytest

from caffe_compat.dashboard.settings import Settings
from caffe_compat.dashboard.store import Store
from caffe_compat.dashboard.workers import Workers


@pytest.fixture
def thread_errors():
    """Exceptions raised in any thread while the test runs."""
    seen, previous = [], threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)
    yield seen
    threading.excepthook = previous


def test_shutdown_waits_for_a_waiter_still_using_the_store(tmp_path, thread_errors):
    settings = Settings(workdir=tmp_path / "work", data_root=tmp_path)
    store = Store(settings.database)
    workers = Workers(settings, store)
    ident = store.add("datasets", "d", "queued", {})
    seen_after_exit = []

    def slow_scheduler():          # what Jobs.start_queued does after every exit, slowly
        time.sleep(0.5)
        seen_after_exit.append(len(store.all("jobs")))

    workers.after_exit = slow_scheduler
    # a child that fails at once (no such subcommand): the waiter records it, then schedules
    workers.run("datasets", ident, ["no-such-command"], tmp_path / "d1", on_success="ready")
    deadline = time.monotonic() + 60
    while workers.running("datasets", ident) and time.monotonic() < deadline:
        time.sleep(0.02)
    workers.shutdown()
    store.close()
    assert thread_errors == [], thread_errors
    assert seen_after_exit == [0]


def test_nothing_starts_once_shutdown_began(tmp_path):
    settings = Settings(workdir=tmp_path / "work", data_root=tmp_path)
    store = Store(settings.database)
    workers = Workers(settings, store)
    workers.shutdown()
    ident = store.add("datasets", "d", "queued", {})
    workers.run("datasets", ident, ["dataset", "--help"], tmp_path / "d1", on_success="ready")
    assert store.get("datasets", ident)["state"] == "queued"
    assert not workers.running("datasets", ident)
    store.close()
