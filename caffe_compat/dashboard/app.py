"""The ASGI app: one FastAPI instance per server, its state, guards and error pages.

``create_app(settings)`` opens the SQLite store (marking work an earlier server left running),
starts nothing by itself, and on shutdown asks every running job to snapshot and stop.
"""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from caffe_compat.commands.common import one_line
from caffe_compat.dashboard import api, pages
from caffe_compat.dashboard.jobs import Jobs
from caffe_compat.dashboard.safety import TOKEN_COOKIE, Refused, same_origin, token_matches
from caffe_compat.dashboard.settings import LOOPBACK, Settings
from caffe_compat.dashboard.store import Store
from caffe_compat.dashboard.workers import Workers, stop_orphans
from caffe_compat.formats import glog

STATIC = Path(__file__).parent / "static"


class Services:
    """What every request handler reaches through ``request.app.state.services``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        settings.workdir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.database)
        left = [r["pid"] for table in ("datasets", "jobs") for r in self.store.all(table)
                if r["state"] == "running" and r["pid"]]
        for pid in stop_orphans(left):
            glog.warning(f"stopped worker {pid}, left running by a dashboard that was killed",
                         "dashboard:recover")
        for table, ident in self.store.recover():
            glog.warning(f"{table[:-1]} {ident} was running when the last dashboard stopped; "
                         "marked " + ("interrupted (resume it from its page)" if table == "jobs"
                                      else "failed"), "dashboard:recover")
        self.workers = Workers(settings, self.store)
        self.jobs = Jobs(settings, self.store, self.workers)
        self.jobs.start_queued()        # jobs that were waiting for a slot when it stopped

    def close(self) -> None:
        self.workers.shutdown()
        self.store.close()


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.services.close()

    app = FastAPI(title="caffe dashboard", version="1", lifespan=lifespan,
                  description="Datasets, training jobs with live curves and classification "
                              "over caffe dataset / caffe fit.",
                  docs_url=None, redoc_url=None)
    app.state.services = Services(settings)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        foreign = same_origin(request.method, request.headers, settings.host in LOOPBACK)
        if foreign:
            return _error(request, 403, foreign)
        expected = settings.token
        if not token_matches(expected, request.headers, request.query_params, request.cookies):
            return _error(request, 401, "this dashboard needs its access token: open the URL "
                                        "it printed (…?token=…) or send 'Authorization: Bearer "
                                        "<token>'")
        response = await call_next(request)
        if expected and request.query_params.get("token") == expected:
            response.set_cookie(TOKEN_COOKIE, expected, httponly=True, samesite="strict")
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return _error(request, exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # a bug of ours: one line for the user, the traceback in the server's log
        glog.error(f"{request.method} {request.url.path}: {traceback.format_exc()}",
                   "dashboard:app")
        return _error(request, 500, f"unexpected error: {one_line(exc)}")

    return app


def _error(request: Request, status: int, message: str):
    """JSON ``{"error": ...}`` for the API, a small page for a browser."""
    if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
        return JSONResponse({"error": message}, status_code=status)
    return HTMLResponse(pages.error_page(status, message), status_code=status)


__all__ = ["create_app", "Services"]
