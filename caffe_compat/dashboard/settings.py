"""Where the dashboard keeps things and who may talk to it."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import caffe_compat

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MB = 1 << 20


def default_models_dir() -> Path:
    """The checkout's ``models/`` (beside the package), else ``./models``."""
    beside = Path(caffe_compat.__file__).resolve().parents[1] / "models"
    return beside if beside.is_dir() else Path("models").resolve()


@dataclass
class Settings:
    """One server's configuration; every path is absolute and resolved."""
    workdir: Path
    data_root: Path
    models_dir: Path = field(default_factory=default_models_dir)
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None             # required on every request when set
    allow_python_layers: bool = False
    max_upload_bytes: int = 20 * MB      # one uploaded image, prototxt or caffemodel part
    max_prototxt_bytes: int = 1 * MB
    concurrent_jobs: int = 1             # training jobs at once (the rest wait, queued)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.data_root = Path(self.data_root).resolve()
        self.models_dir = Path(self.models_dir).resolve()
        if self.host not in LOOPBACK and not self.token:
            self.token = secrets.token_urlsafe(18)

    @property
    def database(self) -> Path:
        return self.workdir / "dashboard.sqlite"

    def folder(self, kind: str, ident: int) -> Path:
        """``<workdir>/<kind>/<id>``: a dataset's or job's own folder."""
        return self.workdir / kind / str(ident)
