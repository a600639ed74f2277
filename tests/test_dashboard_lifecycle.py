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
    seen_after_exit, scheduling = [], threading.Event()

    def slow_scheduler():          # what Jobs.start_queued does after every exit, slowly
        scheduling.set()
        time.sleep(0.5)
        seen_after_exit.append(len(store.all("jobs")))

    workers.after_exit = slow_scheduler
    # a child that fails at once (no such subcommand): the waiter records it, then schedules
    workers.run("datasets", ident, ["no-such-command"], tmp_path / "d1", on_success="ready")
    assert scheduling.wait(60)
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


def test_a_stopped_job_classifies_with_its_newest_snapshot(tmp_path):
    """Stop = snapshot: a job stopped before its end has no fit bundle, but its newest
    snapshot is bundled on demand (and replaced when a newer snapshot appears)."""
    import shutil

    from caffe_compat.commands import fit as fit_cmd
    from caffe_compat.commands.dataset import build_dataset
    from caffe_compat.dashboard import bundles, inference
    from caffe_compat.dashboard.jobs import bundle_dir, run_dir
    from dashboard_utils import draw, image_folder
    settings = Settings(workdir=tmp_path / "work", data_root=tmp_path)
    store = Store(settings.database)
    dataset = store.add("datasets", "shapes", "ready", {})
    job = store.add("jobs", "j", "stopped", {"dataset": dataset, "model": "alexnet_64"})
    record = store.get("jobs", job)
    store.close()
    with pytest.raises(Exception, match="no trained weights yet"):
        bundles.usable(settings, record)
    data = settings.folder("datasets", dataset) / "data"
    build_dataset(image_folder(tmp_path), data)
    fit_cmd.fit(fit_cmd.fit_args(data, run_dir(settings, job), "alexnet_64", epochs=2,
                                 threads="1", progress="never"))
    shutil.rmtree(bundle_dir(settings, job))              # as if stopped before the end
    folder, which = bundles.usable(settings, record)
    last = max(int(p.stem.rsplit("_", 1)[1]) for p in
               (run_dir(settings, job) / "snapshots").glob("*.caffemodel"))
    assert which == f"snapshot of iteration {last}" and folder.name == str(last)
    weights = run_dir(settings, job) / "snapshots" / f"fit_iter_{last}.caffemodel"
    assert (folder / "weights.caffemodel").read_bytes() == weights.read_bytes()
    result = inference.classify(folder, [("c", draw("circle", 1))], top_k=2)[0]
    assert {t["label"] for t in result["top"]} == {"circle", "square"}
    shutil.copyfile(weights, weights.with_name(f"fit_iter_{last + 5}.caffemodel"))
    newer, which = bundles.usable(settings, record)
    assert which == f"snapshot of iteration {last + 5}" and not folder.exists()
