"""The paper's protocol as one job type: N runs of a model, each on its own seeded split of
the same folder, summarised as Table 1 does (validation accuracy, mean ± std over the runs).

A protocol record holds its data sets and jobs; run i builds its split with seed i (e.g. the
paper's 40/10 images per class) and trains once that split is ready. Its state follows them:
``running`` while any builds or trains, ``done`` when every run is done, else ``failed`` or
``stopped`` as the first such run.
"""
from __future__ import annotations

import json
import statistics

from caffe_compat.commands.dataset import LANDMARK_FILE
from caffe_compat.dashboard import datasets
from caffe_compat.dashboard.jobs import (checked_epochs, metrics_path, read_metrics, run_dir,
                                         run_solver)
from caffe_compat.dashboard.safety import Refused, contained

TABLE = "protocols"
MAX_RUNS = 20


def create(services, body: dict) -> int:
    """Start every run's data set and queue its job; returns the protocol's id."""
    try:
        runs = int(body.get("runs", 5))
    except (TypeError, ValueError):
        raise Refused(400, "runs must be a whole number") from None
    if not 2 <= runs <= MAX_RUNS:
        raise Refused(400, f"runs {runs}: 2..{MAX_RUNS} (a mean ± std needs two)")
    model = services.jobs.model_of(body)           # refuse before anything is built
    services.jobs.own_weights(model)
    if services.jobs.landmark_top(model):
        if not isinstance(body.get("folder"), str):
            raise Refused(400, "give 'folder': class sub-folders under the data root")
        folder = contained(services.settings.data_root, body["folder"], "folder")
        if not datasets.landmark_file(services.settings, folder, body.get("landmarks")):
            raise Refused(400, f"model '{model['name']}' reads landmarks but folder "
                               f"'{body['folder']}' has no {LANDMARK_FILE} (or "
                               "give 'landmarks')")
    checked_epochs(body.get("epochs", 10))
    try:
        first_seed = int(body.get("seed", 0))
    except (TypeError, ValueError):
        raise Refused(400, "seed must be a whole number") from None
    split = {k: body[k] for k in ("resize", "val_percent", "per_class", "backend", "landmarks")
             if body.get(k) is not None}
    name = str(body.get("name") or f"{body.get('model')} × {runs} splits")[:100]
    ids = {"datasets": [], "jobs": []}
    for run in range(runs):
        dataset = datasets.create(services.settings, services.store, services.workers, {
            **split, "folder": body.get("folder"), "seed": first_seed + run,
            "name": f"{name}: split {run + 1}"})
        ids["datasets"].append(dataset)
        ids["jobs"].append(services.jobs.create({
            "dataset": dataset, "model": body.get("model"), "prototxt": body.get("prototxt"),
            "epochs": body.get("epochs", 10), "precision": body.get("precision", "fp32"),
            "name": f"{name}: run {run + 1}"}, dataset_pending=True))
    options = {**ids, "model": body.get("model") or "custom", "epochs": body.get("epochs", 10),
               "seeds": [first_seed + r for r in range(runs)], "split": split}
    return services.store.add(TABLE, name, "running", options)


def val_accuracy(settings, job: int) -> float | None:
    """fit.json's validation accuracy, else the last test accuracy of the metrics."""
    try:
        value = json.loads((run_dir(settings, job) / "fit.json").read_text()).get("val_accuracy")
        if value is not None:
            return float(value)
    except (OSError, ValueError):
        pass
    tests = [p for p in read_metrics(metrics_path(settings, job))
             if p.get("kind") == "test" and "accuracy" in p.get("outputs", {})]
    return float(tests[-1]["outputs"]["accuracy"]) if tests else None


def summary(accuracies: list[float]) -> dict:
    """Table 1's cell: mean ± sample standard deviation (n − 1) over the runs."""
    if not accuracies:
        return {"n": 0}
    mean = statistics.fmean(accuracies)
    if len(accuracies) == 1:          # no spread yet: say so rather than "± nan"
        return {"n": 1, "mean": mean, "std": None,
                "text": f"{100 * mean:.2f} % (one run so far)"}
    std = statistics.stdev(accuracies)
    return {"n": len(accuracies), "mean": mean, "std": std,
            "text": f"{100 * mean:.2f} ± {100 * std:.2f} %"}


def epoch_accuracies(settings, job: int) -> dict[int, float]:
    """Test accuracy after each epoch of a job (``caffe fit`` tests once per epoch:
    test_interval is the epoch's iteration count)."""
    interval = run_solver(settings, job).test_interval
    if not interval:
        return {}
    return {p["iter"] // interval: float(p["outputs"]["accuracy"])
            for p in read_metrics(metrics_path(settings, job))
            if p.get("kind") == "test" and not p.get("net") and p["iter"] % interval == 0
            and "accuracy" in p.get("outputs", {}) and p["iter"] > 0}


def by_epoch(settings, jobs: list[int], epochs: int, rows: int = 5) -> list[dict]:
    """Table 1's columns: mean ± std of the runs' test accuracy at ``rows`` evenly spaced
    epochs (the paper's 10, 20, ..., 50 for 50 epochs), over the runs that reached each."""
    step = max(1, epochs // rows)
    per_job = [epoch_accuracies(settings, job) for job in jobs]
    table = []
    for epoch in range(step, epochs + 1, step):
        values = [acc[epoch] for acc in per_job if epoch in acc]
        if values:
            table.append({"epoch": epoch, **summary(values)})
    return table


def describe(services, ident: int) -> dict:
    record = services.store.get(TABLE, ident)
    if record is None:
        raise Refused(404, f"no protocol {ident}")
    runs = []
    for seed, dataset, job in zip(record["options"]["seeds"], record["options"]["datasets"],
                                  record["options"]["jobs"]):
        job_record = services.store.get("jobs", job) or {"state": "missing"}
        runs.append({"seed": seed, "dataset": dataset, "job": job,
                     "state": job_record["state"], "error": job_record.get("error"),
                     "val_accuracy": val_accuracy(services.settings, job)
                     if job_record["state"] == "done" else None})
    states = [r["state"] for r in runs]
    record["state"] = ("done" if all(s == "done" for s in states) else
                       "running" if any(s in ("queued", "running") for s in states) else
                       next(s for s in states if s != "done"))
    record["runs"] = runs
    record["summary"] = summary([r["val_accuracy"] for r in runs
                                 if r["val_accuracy"] is not None])
    record["by_epoch"] = by_epoch(services.settings, record["options"]["jobs"],
                                  int(record["options"]["epochs"]))
    return record


__all__ = ["create", "describe", "summary", "val_accuracy", "TABLE"]
