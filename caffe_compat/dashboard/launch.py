"""Run ``caffe dashboard`` as a child process and talk to it (for scripts and tests), and open
the system Chromium headless (Selenium) to look at its pages.

    with DashboardProcess(workdir, data_root) as server:
        ident = server.call("POST", "/api/datasets", {"folder": "photos"})["id"]
        server.wait_state("datasets", ident, ("ready", "failed"))
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import caffe_compat

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DashboardProcess:
    """The real program on a free loopback port; ``stop()`` sends SIGINT as Ctrl-C does."""

    def __init__(self, workdir: Path, data_root: Path, *extra: str, startup: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"server-{self.port}.log"
        package_parent = str(Path(caffe_compat.__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "caffe_compat.commands.caffe_main", "dashboard",
                 "--port", str(self.port), "--workdir", str(workdir), "--data-root",
                 str(data_root), *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(startup)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """(status, decoded JSON or text) of one API call."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def call(self, method: str, path: str, body: dict | None = None):
        """The JSON answer of a call that must succeed (RuntimeError with its error else)."""
        status, answer = self.request(method, path, body)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer

    def _wait_healthy(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"caffe dashboard exited: {self.log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/api/health")[0] == 200:
                    return
            except OSError:           # not listening yet
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"caffe dashboard did not answer within {seconds:g} s")

    def wait_state(self, kind: str, ident: int, states, seconds: float = 600) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            record = self.call("GET", f"/api/{kind}/{ident}")
            if record["state"] in states:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} {ident} still {record['state']} after {seconds} s")
            time.sleep(0.5)

    def stop(self, seconds: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def chromium_missing() -> str | None:
    """Why a headless Chromium cannot be driven here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return ("Debian's chromium and chromium-driver are not installed (make setup installs "
                "them as root; else apt-get install chromium chromium-driver)")
    return None


def headless_chromium(width: int = 1360, height: int = 1000):
    """A Selenium driver of the system Chromium, headless, with no network of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS + (f"--window-size={width},{height}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    return driver


__all__ = ["DashboardProcess", "headless_chromium", "chromium_missing", "free_port",
           "CHROMIUM_FLAGS"]
