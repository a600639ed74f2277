"""The REST API (documented at ``/openapi.json``). Every refusal is 4xx with ``{"error"}``."""
from __future__ import annotations

import asyncio
import io
import json
import secrets
import zipfile

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from caffe_compat.dashboard import (bundles, datasets, importer, inference, netinfo,
                                    protocols, scoring)
from caffe_compat.dashboard.jobs import FINISHED, metrics_path, read_metrics_from, run_dir
from caffe_compat.dashboard.safety import Refused, read_upload
from caffe_compat.dashboard.store import RUNNING

router = APIRouter(prefix="/api")
POLL_SECONDS = 0.5


def _services(request: Request):
    return request.app.state.services


class DatasetRequest(BaseModel):
    folder: str = Field(description="a folder of class sub-folders, relative to the data root")
    name: str | None = None
    resize: list[int] | None = Field(None, description="[height, width]; default [72, 72]")
    val_percent: float = 20
    per_class: str | None = Field(None, description="'TRAIN/VAL' images per class (e.g. "
                                                    "40/10) instead of val_percent")
    seed: int = 0
    backend: str = "lmdb"
    landmarks: str | bool | None = Field(None, description="a DeepFashion list_landmarks.txt "
                                         "under the data root whose landmarks every record "
                                         "carries (for landmark models); default: the "
                                         "folder's own list_landmarks.txt if any; '' or false: "
                                         "none")


class JobRequest(BaseModel):
    dataset: int
    model: str | None = Field(None, description="a network of models/, e.g. alexnet_64")
    prototxt: str | None = Field(None, description="or a train_val prototxt's text")
    epochs: int = 10
    precision: str = "fp32"
    weights: str | None = Field(None, description="fine-tune from 'job:<id>' (its bundle) or "
                                                  "an uploaded caffemodel's id")
    solver: dict | None = Field(None, description="Caffe solver fields: type, base_lr, "
                                                  "momentum, momentum2, weight_decay, "
                                                  "regularization_type, clip_gradients, delta, "
                                                  "rms_decay")
    batch_size: int | None = None
    name: str | None = None


class ModelText(BaseModel):
    prototxt: str
    phase: str = "TRAIN"


@router.get("/health")
def health(request: Request) -> dict:
    services = _services(request)
    return {"ok": True, "workdir": str(services.settings.workdir),
            "data_root": str(services.settings.data_root),
            "running_jobs": len(services.store.all("jobs", "running"))}


# -- datasets -------------------------------------------------------------------------------
@router.get("/datasets")
def list_datasets(request: Request) -> list[dict]:
    """Every data set, newest first; a build in progress with its ``progress``."""
    s = _services(request)
    return [datasets.describe(s.settings, s.store, r["id"]) if r["state"] in RUNNING else r
            for r in s.store.all(datasets.TABLE)]


@router.post("/datasets", status_code=201)
def create_dataset(request: Request, body: DatasetRequest) -> dict:
    s = _services(request)
    return {"id": datasets.create(s.settings, s.store, s.workers, body.model_dump())}


class ImportRequest(BaseModel):
    train_db: str = Field(description="an LMDB/LevelDB folder under the data root")
    val_db: str
    mean: str = Field(description="its mean.binaryproto")
    labels: str = Field(description="class names, one a line (line i = label i)")
    name: str | None = None


@router.post("/datasets/import", status_code=201)
async def import_dataset(request: Request, body: ImportRequest) -> dict:
    """Existing databases + mean + labels as a ready data set (nothing is copied)."""
    s = _services(request)
    return {"id": await asyncio.to_thread(importer.import_databases, s.settings, s.store,
                                          body.model_dump())}


@router.get("/datasets/{ident}")
def get_dataset(request: Request, ident: int) -> dict:
    s = _services(request)
    return datasets.describe(s.settings, s.store, ident)


@router.get("/datasets/{ident}/mean.png")
def dataset_mean(request: Request, ident: int) -> Response:
    return Response(datasets.mean_png(_services(request).settings, ident), media_type="image/png")


@router.get("/datasets/{ident}/samples.png")
def dataset_samples(request: Request, ident: int) -> FileResponse:
    return FileResponse(datasets.contact_sheet(_services(request).settings, ident))


@router.get("/datasets/{ident}/log")
def dataset_log(request: Request, ident: int) -> Response:
    s = _services(request)
    datasets.describe(s.settings, s.store, ident)
    return _text_file(s.settings.folder(datasets.TABLE, ident) / "worker.log")


# -- models ---------------------------------------------------------------------------------
@router.get("/models")
def list_models(request: Request) -> list[dict]:
    return netinfo.list_models(_services(request).settings.models_dir)


@router.get("/models/{name}")
def get_model(request: Request, name: str) -> dict:
    models_dir = _services(request).settings.models_dir
    path = netinfo.model_file(models_dir, name)
    if path is None:
        raise Refused(404, f"no model '{name}' in {models_dir}")
    solver = netinfo.model_file(models_dir, name, "solver.prototxt")
    return {"name": name, "prototxt": path.read_text(encoding="utf-8"),
            "solver": solver.read_text(encoding="utf-8") if solver else None}


@router.post("/models/validate")
def validate_model(request: Request, body: ModelText) -> dict:
    settings = _services(request).settings
    if len(body.prototxt.encode()) > settings.max_prototxt_bytes:
        raise Refused(413, f"prototxt over {settings.max_prototxt_bytes:,} bytes")
    return netinfo.validate(body.prototxt,
                            allow_python_layers=settings.allow_python_layers).as_dict()


@router.post("/models/draw")
def draw_model(request: Request, body: ModelText) -> Response:
    if len(body.prototxt.encode()) > _services(request).settings.max_prototxt_bytes:
        raise Refused(413, "prototxt too large to draw")
    try:
        svg = netinfo.draw_svg(body.prototxt, phase=body.phase)
    except (ValueError, RuntimeError) as exc:
        raise Refused(400, str(exc)) from None
    return Response(svg, media_type="image/svg+xml")


@router.post("/uploads", status_code=201)
async def upload_weights(request: Request, file: UploadFile = File(...)) -> dict:
    """A .caffemodel to fine-tune from; returns the id to pass as a job's ``weights``."""
    settings = _services(request).settings
    data = await read_upload(file, settings.max_upload_bytes * 25, "caffemodel")
    ident = f"{secrets.token_hex(8)}.caffemodel"
    folder = settings.workdir / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ident).write_bytes(data)
    return {"id": ident, "bytes": len(data)}


# -- jobs -----------------------------------------------------------------------------------
@router.get("/jobs")
def list_jobs(request: Request) -> list[dict]:
    """Every job, newest first; a running one with its ``progress`` (iteration, ETA)."""
    s = _services(request)
    return [s.jobs.describe(r["id"]) if r["state"] in RUNNING else r
            for r in s.store.all("jobs")]


@router.post("/jobs", status_code=201)
def create_job(request: Request, body: JobRequest) -> dict:
    return {"id": _services(request).jobs.create(body.model_dump())}


@router.get("/jobs/{ident}")
def get_job(request: Request, ident: int) -> dict:
    return _services(request).jobs.describe(ident)


@router.get("/jobs/{ident}/metrics")
def job_metrics(request: Request, ident: int, since: int = 0) -> list[dict]:
    """The metrics points (``caffe train``'s JSON lines: kind train/test/snapshot)."""
    s = _services(request)
    s.jobs.get(ident)
    points, _ = read_metrics_from(metrics_path(s.settings, ident), max(0, since))
    return points


@router.get("/jobs/{ident}/stream")
async def job_stream(request: Request, ident: int) -> StreamingResponse:
    """Server-sent events: ``metric`` per new point, ``state`` on each change, then ``end``."""
    s = _services(request)
    s.jobs.get(ident)
    path = metrics_path(s.settings, ident)

    async def events():
        offset, state = 0, None
        while not await request.is_disconnected():
            points, offset = read_metrics_from(path, offset)
            for point in points:
                yield f"event: metric\ndata: {json.dumps(point)}\n\n"
            record = s.jobs.describe(ident)
            if record["state"] != state or points:
                state = record["state"]
                yield f"event: state\ndata: {json.dumps(_brief(record))}\n\n"
            if state in FINISHED and not points:
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _brief(record: dict) -> dict:
    return {k: record.get(k) for k in ("id", "state", "error", "progress", "result", "bundle",
                                       "snapshot", "log")}


@router.post("/jobs/{ident}/stop")
def stop_job(request: Request, ident: int) -> dict:
    return _services(request).jobs.stop(ident)


@router.post("/jobs/{ident}/resume")
def resume_job(request: Request, ident: int) -> dict:
    return _services(request).jobs.resume(ident)


@router.get("/jobs/{ident}/log")
def job_log(request: Request, ident: int) -> Response:
    s = _services(request)
    s.jobs.get(ident)
    log = run_dir(s.settings, ident) / "train.log"
    return _text_file(log if log.is_file() else s.settings.folder("jobs", ident) / "worker.log")


@router.get("/jobs/{ident}/bundle.zip")
async def job_bundle(request: Request, ident: int) -> Response:
    """The job's model bundle (a stopped job's: made from its newest snapshot)."""
    s = _services(request)
    bundle, which = await asyncio.to_thread(bundles.usable, s.settings, s.jobs.get(ident))
    name = f"job{ident}_bundle" if which == "final weights" else \
        f"job{ident}_iter{bundle.name}_bundle"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file() and not p.is_symlink()):
            archive.write(path, f"{name}/{path.relative_to(bundle)}")
    return Response(buffer.getvalue(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{name}.zip"'})


@router.post("/jobs/{ident}/classify")
async def classify(request: Request, ident: int, image: list[UploadFile] = File(...),
                   top_k: int = 5) -> dict:
    """Top-k labels with probabilities for one or more uploaded images (field ``image``);
    a landmark model's also carry ``landmarks`` and an ``overlay`` PNG (data URL) of its
    heatmaps over the photo. ``weights`` says which: the final ones or a stopped job's
    newest snapshot."""
    s = _services(request)
    record = s.jobs.get(ident)
    if len(image) > 64:
        raise Refused(413, f"{len(image)} images at once; at most 64")
    decoded = []
    for upload in image:
        data = await read_upload(upload, s.settings.max_upload_bytes, upload.filename or "image")
        decoded.append((upload.filename or "image", inference.decode_image(data, upload.filename
                                                                           or "image")))
    bundle, which = await asyncio.to_thread(bundles.usable, s.settings, record)
    results = await asyncio.to_thread(inference.classify, bundle, decoded, top_k)
    return {"job": ident, "weights": which, "results": results}


class ProtocolRequest(BaseModel):
    folder: str = Field(description="class sub-folders under the data root")
    model: str | None = None
    prototxt: str | None = None
    runs: int = Field(5, description="splits, seeds seed .. seed+runs-1")
    epochs: int = 10
    per_class: str | None = Field(None, description="e.g. '40/10' (the paper's split)")
    val_percent: float | None = None
    resize: list[int] | None = None
    seed: int = 0
    landmarks: str | bool | None = Field(None, description="as for a dataset (default: the "
                                         "folder's list_landmarks.txt if any)")
    name: str | None = None


@router.get("/protocols")
def list_protocols(request: Request) -> list[dict]:
    s = _services(request)
    return [protocols.describe(s, r["id"]) for r in s.store.all(protocols.TABLE)]


@router.post("/protocols", status_code=201)
def create_protocol(request: Request, body: ProtocolRequest) -> dict:
    """The paper's protocol: one run per seeded split; Table 1's mean ± std when done."""
    return {"id": protocols.create(_services(request), body.model_dump())}


@router.get("/protocols/{ident}")
def get_protocol(request: Request, ident: int) -> dict:
    return protocols.describe(_services(request), ident)


class ScoreRequest(BaseModel):
    folder: str = Field(description="class sub-folders named as the bundle's labels, relative "
                                    "to the data root")


@router.post("/jobs/{ident}/score")
async def score_job(request: Request, ident: int, body: ScoreRequest) -> dict:
    """Accuracy, per-class precision/recall and the confusion matrix on a labelled folder."""
    s = _services(request)
    bundle, which = await asyncio.to_thread(bundles.usable, s.settings, s.jobs.get(ident))
    summary = await asyncio.to_thread(scoring.score, s.settings, ident, bundle, body.folder)
    return dict(summary, weights=which)


@router.get("/jobs/{ident}/scores/{number}/{name}")
def score_picture(request: Request, ident: int, number: int, name: str) -> FileResponse:
    return FileResponse(scoring.picture(_services(request).settings, ident, number, name))


def _text_file(path) -> Response:
    if not path.is_file():
        raise Refused(404, "no log yet")
    return Response(path.read_bytes()[-2_000_000:], media_type="text/plain; charset=utf-8")


__all__ = ["router"]
