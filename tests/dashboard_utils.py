"""Shared by the dashboard tests: a tiny image folder, an app on a temporary workdir."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square")


def draw(kind: str, seed: int, size: int = 40) -> np.ndarray:
    """A BGR image of a white circle or square on noise (two classes a net learns at once)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    centre, radius = size // 2 + int(rng.integers(-3, 4)), size // 4 + int(rng.integers(0, 3))
    if kind == "circle":
        cv2.circle(image, (centre, centre), radius, (255, 255, 255), -1)
    else:
        cv2.rectangle(image, (centre - radius, centre - radius), (centre + radius,
                      centre + radius), (255, 255, 255), -1)
    return image


def image_folder(root: Path, name: str = "shapes", per_class: int = 10) -> Path:
    """``root/name/<class>/<n>.png``: ``per_class`` drawings of each class."""
    folder = root / name
    for label, kind in enumerate(CLASSES):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(str(folder / kind / f"{i}.png"), draw(kind, 100 * label + i))
    return folder


def png_bytes(kind: str = "circle", seed: int = 7) -> bytes:
    return cv2.imencode(".png", draw(kind, seed))[1].tobytes()


class Server:
    """``caffe dashboard`` in a child process on a free loopback port (the real program)."""

    def __init__(self, workdir: Path, data_root: Path, *extra: str):
        import os
        import socket
        import subprocess
        import sys
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir.parent / f"server-{self.port}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "caffe_compat.commands.caffe_main", "dashboard",
                 "--port", str(self.port), "--workdir", str(workdir), "--data-root",
                 str(data_root), *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_healthy()

    def get(self, path: str, **kw):
        import httpx
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw):
        import httpx
        return httpx.post(self.url + path, timeout=60, **kw)

    def wait_healthy(self, seconds: float = 120) -> None:
        import time
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the dashboard exited: {self.log.read_text()[-2000:]}")
            try:
                if self.get("/api/health").status_code == 200:
                    return
            except Exception:      # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.3)
        raise RuntimeError("the dashboard did not answer in time")

    def wait_state(self, kind: str, ident: int, states, seconds: float = 300) -> dict:
        import time
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            record = self.get(f"/api/{kind}/{ident}").json()
            if record["state"] in states:
                return record
            time.sleep(0.5)
        raise AssertionError(f"{kind} {ident} still {record['state']}: {record.get('error')}")

    def stop(self, seconds: float = 90) -> int:
        import signal
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=seconds)
