"""``caffe dashboard``: serve the web dashboard (datasets, training jobs, classification).

    caffe dashboard [--host 127.0.0.1] [--port 8080] [--workdir DIR] [--data-root DIR]
                    [--token T] [--allow-python-layers] [--models DIR]

Binds to loopback by default. Any other host needs a token: ``--token`` or one generated and
printed; every request must then carry it (the printed URL sets a cookie in the browser).
Datasets are built only from folders under ``--data-root``; jobs, datasets and uploads live
in ``--workdir`` with their SQLite records, so a restarted server shows them again (a job that
was running is marked interrupted and resumes from its last snapshot). Ctrl-C stops the
server after asking every running job to snapshot and stop.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from caffe_compat.commands.common import CliError, add_debug_flag
from caffe_compat.dashboard.settings import Settings, default_models_dir

HELP = "serve the web dashboard: datasets, training jobs with live curves, classification"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--host", default="127.0.0.1",
                    help="the address to listen on (default 127.0.0.1: this machine only; "
                         "any other needs a token)")
    ap.add_argument("--port", type=int, default=8080, help="the TCP port (default 8080)")
    ap.add_argument("--workdir", default="dashboard",
                    help="where datasets, jobs, uploads and the SQLite records live "
                         "(default ./dashboard)")
    ap.add_argument("--data-root", "--data_root", dest="data_root", default=".",
                    help="datasets are built only from folders under this one (default .)")
    ap.add_argument("--models", default=None,
                    help=f"the model library (default {default_models_dir()})")
    ap.add_argument("--token", default=None,
                    help="the access token every request must carry (generated when the host "
                         "is not loopback and none is given)")
    ap.add_argument("--allow-python-layers", "--allow_python_layers",
                    dest="allow_python_layers", action="store_true",
                    help="let prototxt run type: \"Python\" layers (user code; refused by "
                         "default)")
    add_debug_flag(ap)


def settings_from(args: argparse.Namespace) -> Settings:
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise CliError(f"--data-root {args.data_root}: no such folder")
    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port}: must be 1..65535")
    extra = {"models_dir": Path(args.models)} if args.models else {}
    return Settings(workdir=Path(args.workdir), data_root=data_root, host=args.host,
                    port=args.port, token=args.token,
                    allow_python_layers=args.allow_python_layers, **extra)


def main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        import uvicorn
        from caffe_compat.dashboard.app import create_app
    except ImportError as exc:
        raise CliError(f"caffe dashboard needs {exc.name}: pip install fastapi uvicorn "
                       "python-multipart jinja2") from None
    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{settings.port}/"
    if settings.token:
        url += f"?token={settings.token}"
    print(f"caffe dashboard: {url}  (workdir {settings.workdir}, data root "
          f"{settings.data_root}; Ctrl-C stops)", flush=True)
    # a browser keeps the metrics stream open: give it 5 s, then close it and stop the jobs
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


__all__ = ["add_arguments", "main", "settings_from"]
