"""The fuzz tier's engine: mutate seed inputs, read each in a worker process, classify.

Outcomes: ``loaded``; ``clean`` (the project's CaffeCompatError, one line, naming the file);
``raw`` (any other exception, or an error message that is multi-line or does not name the
file); ``memory`` (MemoryError under the worker's address-space limit); ``crash`` (the worker
died); ``hang`` (no answer within the time limit). The invariant: only loaded and clean.

Workers run ``python fuzz_harness.py --worker FOLDER`` and read ``FORMAT PATH`` lines from
stdin, answering one JSON line each; a crash or hang costs one worker, which is restarted.
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OK = ("loaded", "clean")
ADDRESS_LIMIT = 12 << 30        # the worker's RLIMIT_AS: a huge allocation fails, not swaps
BUDGET = "256M"                 # CAFFE_COMPAT_MEMORY_BUDGET inside workers


# ---------------------------------------------------------------------------- mutations


def _numbers(data: bytes, rng: random.Random) -> bytes:
    """Replace a number in text with a huge, negative or odd one."""
    found = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?", data)]
    if not found:
        return data
    start, end = rng.choice(found)
    new = rng.choice([b"2147483647", b"-1", b"-2147483648", b"4294967296", b"0", b"1e308",
                      b"99999999999999999999", b"nan", b"-0", b"100000", b"1_0"])
    return data[:start] + new + data[end:]


def _duplicate_line(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    return b"\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])


def mutate(data: bytes, rng: random.Random, text: bool) -> bytes:
    """One to three of: bit flips, truncation, inserted bytes, byte runs, text edits."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["flip", "flip", "truncate", "insert", "overwrite"]
                          + (["number", "number", "duplicate"] if text else []))
        if not out:
            out = bytearray(b"\x00")
        pos = rng.randrange(len(out))
        if kind == "flip":
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = rng.choice([b"\xff" * rng.randint(1, 8), os.urandom(rng.randint(1, 16)),
                                       b"\x00\x00\x00\x80", b"{", b"}", b"\n"])
        elif kind == "overwrite":
            out[pos:pos + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00",
                                           b"\xff\xff\xff\xff", os.urandom(4)])
        elif kind == "number":
            out = bytearray(_numbers(bytes(out), rng))
        else:
            out = bytearray(_duplicate_line(bytes(out), rng))
    return bytes(out)


# ---------------------------------------------------------------------------- worker side


def _classify(exc: BaseException, path: str) -> tuple[str, str]:
    from caffe_compat.formats.errors import CaffeCompatError
    text = str(exc)
    if isinstance(exc, MemoryError):
        return "memory", "MemoryError"
    if not isinstance(exc, CaffeCompatError):
        return "raw", f"{type(exc).__name__}: {text[:300]}"
    if "\n" in text.strip():
        return "raw", f"multi-line message: {text[:300]!r}"
    names = (path, os.path.basename(path), os.path.dirname(path))
    if not any(n and n in text for n in names) and "layer '" not in text:
        return "raw", f"message names neither the file nor a layer: {text[:300]}"
    return "clean", text[:300]


def worker(folder: str) -> None:
    """Answer ``FORMAT PATH`` lines with JSON outcomes until stdin closes."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))
    sys.path.insert(0, str(HERE))
    import logging
    logging.disable(logging.CRITICAL)
    from fuzz_seeds import READERS
    import caffe_compat  # noqa: F401  (torch and the readers load before the clock starts)
    import caffe_compat.pycaffe_solver  # noqa: F401
    os.chdir(folder)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        fmt, path = line.rstrip("\n").split(" ", 1)
        try:
            READERS[fmt](path, folder)
            outcome, detail = "loaded", ""
        except BaseException as exc:  # noqa: BLE001 - classifying is the point
            outcome, detail = _classify(exc, path)
        print(json.dumps({"outcome": outcome, "detail": detail}), flush=True)


# ---------------------------------------------------------------------------- parent side


class Pool:
    """One worker process, restarted after a crash or a hang."""

    def __init__(self, folder: str, timeout: float = 60.0):
        self.folder, self.timeout, self.proc = folder, timeout, None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), CAFFE_COMPAT_MEMORY_BUDGET=BUDGET,
                   CAFFE_COMPAT_DATA_WORKERS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), "--worker",
                                      self.folder], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self._answer(timeout=300)

    def _answer(self, timeout: float) -> dict | None:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, fmt: str, path: str) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{fmt} {path}\n")
        self.proc.stdin.flush()
        answer = self._answer(self.timeout)
        if answer is not None:
            return answer["outcome"], answer["detail"]
        if self.proc.poll() is None:
            self.close()
            return "hang", f"no answer in {self.timeout:.0f} s"
        code = self.proc.returncode
        self.proc = None
        return "crash", f"worker died with status {code}"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def seeds_in(folder: str) -> dict[str, list[bytes]]:
    """Build the fixtures in ``folder`` (in a worker-like environment) and return seeds."""
    sys.path.insert(0, str(HERE))
    from fuzz_seeds import make_seeds
    return make_seeds(folder)


def input_path(folder: str, fmt: str, index: int) -> str:
    from fuzz_seeds import SUFFIX
    return os.path.join(folder, "inputs", f"{fmt}_{index}{SUFFIX.get(fmt, '.bin')}")


def write_input(folder: str, fmt: str, index: int, data: bytes) -> str:
    path = input_path(folder, fmt, index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def new_folder() -> str:
    return tempfile.mkdtemp(prefix="caffe-compat-fuzz-")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
