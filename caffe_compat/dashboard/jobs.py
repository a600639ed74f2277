"""Training jobs: ``caffe fit`` on a ready dataset, its metrics stream, stop and resume.

A job's folder ``<workdir>/jobs/<id>/`` holds the worker's log, an edited prototxt when one was
pasted, and ``run/``: ``caffe fit --out`` (train_val/solver prototxt, snapshots/ with
``fit.metrics.jsonl`` and ``fit.png``, train.log, fit.json, bundle/).
"""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from caffe_compat.commands import netedit
from caffe_compat.commands.model_library import model_weights
from caffe_compat.dashboard import datasets, netinfo, solverform
from caffe_compat.dashboard.safety import Refused
from caffe_compat.dashboard.settings import Settings
from caffe_compat.dashboard.store import RUNNING, Store
from caffe_compat.dashboard.workers import Workers
from caffe_compat.formats.atomic import write_text
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.formats.errors import CaffeCompatError
from caffe_compat.proto import caffe_pb2

TABLE = "jobs"
FINISHED = ("done", "failed", "stopped", "interrupted")
RESUMABLE = ("stopped", "interrupted", "failed")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
TAIL_BYTES = 64 << 10
_SNAPSHOT = re.compile(r"_iter_(\d+)\.caffemodel$")


def run_dir(settings: Settings, ident: int) -> Path:
    return settings.folder(TABLE, ident) / "run"


def metrics_path(settings: Settings, ident: int) -> Path:
    return run_dir(settings, ident) / "snapshots" / "fit.metrics.jsonl"


def bundle_dir(settings: Settings, ident: int) -> Path:
    return run_dir(settings, ident) / "bundle"


def newest_snapshot(settings: Settings, job: int) -> tuple[int, Path] | None:
    """(iteration, caffemodel) of the run's newest snapshot, if any."""
    found = []
    for path in (run_dir(settings, job) / "snapshots").glob("*.caffemodel"):
        match = _SNAPSHOT.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


class Jobs:
    """Create, queue, start, stop and resume jobs of one server."""

    def __init__(self, settings: Settings, store: Store, workers: Workers):
        self.settings, self.store, self.workers = settings, store, workers
        self._starting = threading.Lock()      # one scheduler pass at a time
        workers.after_exit = self.start_queued  # a finished job or data set frees the way

    def create(self, body: dict, dataset_pending: bool = False) -> int:
        """A queued job; ``dataset_pending``: its data set may still be building (the job
        waits for it, and fails if the build fails)."""
        dataset = self._ready_dataset(body.get("dataset"), dataset_pending)
        model = self.model_of(body)
        self._check_landmarks(model, dataset)
        epochs = checked_epochs(body.get("epochs", 10))
        precision = body.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise Refused(400, f"precision '{precision}': one of {', '.join(PRECISIONS)}")
        solver = solverform.checked(body.get("solver"))
        batch = body.get("batch_size")
        if batch is not None and not (isinstance(batch, int) and 1 <= batch <= 4096):
            raise Refused(400, f"batch_size {batch}: a whole number 1..4096")
        options = {"dataset": dataset["id"], "epochs": epochs, "precision": precision,
                   "model": model["name"],
                   "weights": self._weights(body.get("weights")) or self.own_weights(model),
                   "solver": solver, "batch_size": batch}
        own_solver = solverform.solver_text(model["solver"], solver) if solver else None
        ident = self.store.add(TABLE, str(body.get("name") or f"{model['name']} on "
                                          f"{dataset['name']}")[:100], "queued", options)
        if model["text"] is not None or own_solver is not None:
            # the job's own model files: caffe fit reads solver.prototxt beside train_val
            folder = self.settings.folder(TABLE, ident)
            folder.mkdir(parents=True, exist_ok=True)
            write_text(folder / "train_val.prototxt", model["text"] if model["text"] is not None
                       else netinfo.model_file(self.settings.models_dir, model["name"])
                       .read_text(encoding="utf-8"))
            if own_solver is not None:
                write_text(folder / "solver.prototxt", own_solver)
        self.start_queued()
        return ident

    def _ready_dataset(self, ident, pending_ok: bool = False) -> dict:
        try:
            record = self.store.get(datasets.TABLE, int(ident))
        except (TypeError, ValueError):
            raise Refused(400, "give 'dataset': the id of a ready dataset") from None
        if record is None:
            raise Refused(404, f"no dataset {ident}")
        if record["state"] != "ready" and not (pending_ok and record["state"] in RUNNING):
            raise Refused(409, f"dataset {ident} is {record['state']}, not ready")
        return record

    def model_of(self, body: dict) -> dict:
        """A library model by name, or a pasted prototxt that validates."""
        text = body.get("prototxt")
        if text:
            if len(text.encode()) > self.settings.max_prototxt_bytes:
                raise Refused(413, f"prototxt over {self.settings.max_prototxt_bytes:,} bytes")
            check = netinfo.validate(text, allow_python_layers=self.settings.allow_python_layers)
            if not check.ok:
                raise Refused(400, "; ".join(p.message for p in check.errors))
            return {"name": check.name or "custom", "text": text, "solver": None}
        name = body.get("model")
        if not isinstance(name, str) or netinfo.model_file(self.settings.models_dir, name) is None:
            known = ", ".join(m["name"] for m in netinfo.list_models(self.settings.models_dir))
            raise Refused(400, f"model '{name}': not in {self.settings.models_dir} "
                               f"(known: {known}); or give 'prototxt'")
        return {"name": name, "text": None,
                "solver": netinfo.model_file(self.settings.models_dir, name, "solver.prototxt")}

    def landmark_top(self, model: dict) -> str | None:
        """The landmarks top of a model's Data layer (a landmark model), else None; 400 when
        its data layers are none that caffe fit can feed."""
        text = model["text"] if model["text"] is not None else \
            netinfo.model_file(self.settings.models_dir, model["name"]).read_text("utf-8")
        try:
            return netedit.data_layers(netinfo.parse(text, "train_val.prototxt"),
                                       model["name"]).landmark_top
        except (CaffeCompatError, ValueError) as exc:
            raise Refused(400, str(exc)) from None

    def _check_landmarks(self, model: dict, dataset: dict) -> None:
        """A landmark model (its Data layer's third top) needs records with landmarks."""
        top = self.landmark_top(model)
        has = dataset["result"].get("landmarks") if dataset["state"] == "ready" else \
            dataset["options"].get("landmarks")
        if top and not has:
            raise Refused(400, f"model '{model['name']}' reads landmarks (data layer top "
                               f"'{top}') but dataset {dataset['id']} has none: build it from "
                               "a folder with a list_landmarks.txt (or give 'landmarks')")

    def own_weights(self, model: dict) -> str | None:
        """The caffemodel a library model's own solver fine-tunes from (models/*_finetune);
        400 saying how to make it when it is missing."""
        pretrained = model_weights(model["solver"])
        if pretrained is None:
            return None
        if not pretrained.is_file():
            raise Refused(400, f"model '{model['name']}' fine-tunes from {pretrained} (its "
                               "solver's weights:), which does not exist: its readme says how "
                               "to make it; or give 'weights' (an uploaded caffemodel or "
                               "job:<id>)")
        return str(pretrained)

    def _weights(self, given) -> str | None:
        """Fine-tune from a finished job's bundle (``"job:<id>"``) or an uploaded file id."""
        if not given:
            return None
        if isinstance(given, str) and given.startswith("job:"):
            if not given[4:].isdigit():
                raise Refused(400, f"weights '{given}': job:<id> with a job's number")
            path = bundle_dir(self.settings, int(given[4:])) / "weights.caffemodel"
        else:
            path = self.settings.workdir / "uploads" / Path(str(given)).name
        if not path.is_file():
            raise Refused(404, f"weights '{given}': no such caffemodel")
        return str(path)

    # -- running ----------------------------------------------------------------------------
    def start_queued(self) -> None:
        """Start queued jobs, oldest first, while slots are free and their data is ready."""
        with self._starting:
            running = len(self.store.all(TABLE, "running"))
            for record in reversed(self.store.all(TABLE, "queued")):
                if running >= self.settings.concurrent_jobs:
                    return
                dataset = self.store.get(datasets.TABLE, record["options"]["dataset"])
                if dataset is None or dataset["state"] in ("failed",):
                    self.store.update(TABLE, record["id"], state="failed",
                                      error=f"its data set {record['options']['dataset']} "
                                            "failed to build")
                    continue
                if dataset["state"] != "ready":
                    continue
                self._start(record, resume=record["options"].get("resume", False))
                running += 1

    def _start(self, record: dict, resume: bool) -> None:
        ident, options = record["id"], record["options"]
        folder = self.settings.folder(TABLE, ident)
        own = folder / "train_val.prototxt"      # pasted, or a copy beside its own solver
        model = own if own.is_file() else \
            netinfo.model_file(self.settings.models_dir, options["model"])
        if model is None:
            self.store.update(TABLE, ident, state="failed",
                              error=f"model '{options['model']}' is gone from the library")
            return
        argv = ["fit", str(datasets.data_dir(self.settings, options["dataset"])),
                "--model", str(model),
                "--out", str(run_dir(self.settings, ident)),
                "--epochs", str(options["epochs"]), "--precision", options["precision"],
                "--progress", "never"]
        if options.get("weights") and not resume:
            argv += ["--weights", options["weights"]]
        if options.get("batch_size") and not resume:
            argv += ["--batch-size", str(options["batch_size"])]
        if resume:
            argv.append("--resume")
        self.workers.run(TABLE, ident, argv, folder, on_success="done",
                         result_of=lambda: fit_summary(self.settings, ident))

    def stop(self, ident: int) -> dict:
        record = self.get(ident)
        if record["state"] == "queued":
            self.store.update(TABLE, ident, state="stopped")
        elif not self.workers.stop(TABLE, ident):
            raise Refused(409, f"job {ident} is {record['state']}; only a running or queued "
                               "job can be stopped")
        return {"id": ident, "stopping": True}

    def resume(self, ident: int) -> dict:
        record = self.get(ident)
        if record["state"] not in RESUMABLE:
            raise Refused(409, f"job {ident} is {record['state']}; only a stopped, interrupted "
                               "or failed job resumes")
        options = dict(record["options"], resume=True)
        self.store.update(TABLE, ident, state="queued", options=options, error=None)
        self.start_queued()
        return {"id": ident, "state": self.get(ident)["state"]}

    # -- reading ----------------------------------------------------------------------------
    def get(self, ident: int) -> dict:
        record = self.store.get(TABLE, ident)
        if record is None:
            raise Refused(404, f"no job {ident}")
        return record

    def describe(self, ident: int) -> dict:
        record = self.get(ident)
        path = metrics_path(self.settings, ident)
        try:      # the pace needs the last lines only: read a fixed tail, whatever the length
            start = max(0, path.stat().st_size - TAIL_BYTES)
        except OSError:
            start = 0
        points, _ = read_metrics_from(path, start)
        record["progress"] = progress(points, self.max_iter(ident))
        record["bundle"] = (bundle_dir(self.settings, ident) / "weights.caffemodel").is_file()
        snapshot = newest_snapshot(self.settings, ident)
        record["snapshot"] = snapshot[0] if snapshot else None     # its newest, by iteration
        record["log"] = (run_dir(self.settings, ident) / "train.log").is_file()
        return record

    def max_iter(self, ident: int) -> int | None:
        return run_solver(self.settings, ident).max_iter or None


def run_solver(settings: Settings, ident: int) -> caffe_pb2.SolverParameter:
    """The solver ``caffe fit`` wrote for the job (empty before it has: fields read 0)."""
    try:
        return read_text_proto(run_dir(settings, ident) / "solver.prototxt",
                               caffe_pb2.SolverParameter)
    except (OSError, ValueError):
        return caffe_pb2.SolverParameter()


def fit_summary(settings: Settings, ident: int) -> dict:
    """What the job's list row shows of a finished ``caffe fit``: its fit.json's validation
    accuracy, iterations and seconds (nothing when it wrote none)."""
    try:
        record = json.loads((run_dir(settings, ident) / "fit.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: record.get(k) for k in ("val_accuracy", "iterations", "seconds")}


def checked_epochs(value) -> int:
    try:
        epochs = int(value)
    except (TypeError, ValueError):
        raise Refused(400, "epochs must be a whole number") from None
    if not 1 <= epochs <= 10_000:
        raise Refused(400, f"epochs {epochs}: must be 1..10000")
    return epochs


def read_metrics(path: Path, offset: int = 0) -> list[dict]:
    """The complete JSON lines of a metrics file from byte ``offset`` (a line still being
    written is left for the next read; a cut first line is skipped)."""
    points, _ = read_metrics_from(path, offset)
    return points


def read_metrics_from(path: Path, offset: int) -> tuple[list[dict], int]:
    """(points, the offset after the last complete line)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    points = []
    for line in data[:end].splitlines():
        try:
            points.append(json.loads(line))
        except ValueError:
            continue
    return points, offset + end


def progress(points: list[dict], max_iter: int | None) -> dict:
    """Iteration, throughput and ETA from the train points (the last 20 iterations' pace)."""
    train = [p for p in points if p.get("kind") == "train"]
    if not train:
        return {"iter": 0, "max_iter": max_iter}
    recent = [p for p in train[-20:] if p.get("seconds") and p.get("images_per_second")]
    seconds = sum(p["seconds"] for p in recent)
    images = sum(p["seconds"] * p["images_per_second"] for p in recent)
    per_iter = seconds / len(recent) if recent else None
    last = train[-1]["iter"]
    eta = (max_iter - last) * per_iter if per_iter and max_iter and max_iter > last else None
    return {"iter": last, "max_iter": max_iter, "seconds_per_iter": per_iter,
            "images_per_second": images / seconds if seconds else None, "eta_seconds": eta}


__all__ = ["Jobs", "checked_epochs", "fit_summary", "run_solver", "read_metrics",
           "read_metrics_from", "progress", "run_dir", "metrics_path", "bundle_dir",
           "newest_snapshot", "FINISHED", "TABLE"]
