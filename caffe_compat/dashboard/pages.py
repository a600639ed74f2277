"""Server-rendered pages (Jinja2); their scripts in ``static/`` call the REST API."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from caffe_compat.dashboard import datasets, netinfo, protocols
from caffe_compat.dashboard.solverform import SOLVER_TYPES

router = APIRouter(include_in_schema=False)
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))


def _render(name: str, **context) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context))


def error_page(status: int, message: str) -> str:
    return TEMPLATES.get_template("error.html").render(status=status, message=message)


@router.get("/", response_class=HTMLResponse)
def home(request: Request):
    s = request.app.state.services
    return _render("index.html", title="caffe dashboard",
                   datasets=s.store.all(datasets.TABLE), jobs=s.store.all("jobs"),
                   protocols=[protocols.describe(s, r["id"])
                              for r in s.store.all(protocols.TABLE)],
                   models=netinfo.list_models(s.settings.models_dir),
                   data_root=s.settings.data_root, solver_types=SOLVER_TYPES,
                   folders=_folders(s.settings.data_root))


def _folders(root: Path, limit: int = 200) -> list[str]:
    """Folders under the data root with two or more sub-folders (dataset candidates)."""
    found = []
    for depth in range(3):
        for path in sorted(root.glob("/".join(["*"] * (depth + 1)))):
            if path.is_dir() and not path.is_symlink() and len(datasets.classes_of(path)) >= 2:
                found.append(str(path.relative_to(root)))
            if len(found) >= limit:
                return found
    return found


@router.get("/datasets/{ident}", response_class=HTMLResponse)
def dataset_page(request: Request, ident: int):
    s = request.app.state.services
    record = datasets.describe(s.settings, s.store, ident)
    return _render("dataset.html", title=f"dataset {record['name']}", d=record)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, name: str = "alexnet_64"):
    s = request.app.state.services
    models = netinfo.list_models(s.settings.models_dir)
    path = netinfo.model_file(s.settings.models_dir, name)
    return _render("models.html", title="models", models=models, current=name if path else "",
                   text=path.read_text(encoding="utf-8") if path else "",
                   allow_python=s.settings.allow_python_layers,
                   datasets=s.store.all(datasets.TABLE, "ready"))


@router.get("/jobs/{ident}", response_class=HTMLResponse)
def job_page(request: Request, ident: int):
    s = request.app.state.services
    record = s.jobs.describe(ident)
    return _render("job.html", title=f"job {ident}: {record['name']}", job=record)


@router.get("/protocols/{ident}", response_class=HTMLResponse)
def protocol_page(request: Request, ident: int):
    record = protocols.describe(request.app.state.services, ident)
    return _render("protocol.html", title=f"protocol {ident}: {record['name']}", p=record)


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, jobs: str = ""):
    s = request.app.state.services
    chosen = [int(j) for j in jobs.split(",") if j.strip().isdigit()]
    return _render("compare.html", title="compare runs", jobs=s.store.all("jobs"),
                   chosen=chosen)


__all__ = ["router", "error_page"]
