"""--allocator (engine/allocator.py): ``reuse`` really stops the per-step page faults, and
``caffe train`` applies and logs it. mallopt is process-wide, so each case runs in its own
process and the test process keeps glibc's defaults."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from caffe_compat.engine.allocator import use_allocator
from test_cli_train import write_solver

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# The process loads the engine first, as `caffe train` does before it applies --allocator:
# glibc's heap then already spans the library's allocations, and where the 64 MiB block
# lands depends on that (with torch alone the heap's top is often pinned and glibc falls
# back to mmap, a fresh mapping per step whatever the setting).
FAULTS = """
import json, resource, sys, torch
import caffe_compat.pycaffe
from caffe_compat.engine.allocator import use_allocator
choice = use_allocator(sys.argv[1])
def step():             # a 64 MiB activation, written and freed, as a training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20); t.fill_(1.0); del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": choice.applied, "faults": [step() for _ in range(9)]}))
"""
PAGES = (64 << 20) // 4096


def _faults(name: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, name], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_unknown_allocator_is_refused():
    with pytest.raises(ValueError, match="known allocators are system, reuse"):
        use_allocator("jemalloc")


@glibc_only
def test_reuse_stops_page_faults_that_the_system_default_takes_every_step():
    system, reuse = _faults("system"), _faults("reuse")
    assert system["applied"] and reuse["applied"]
    # glibc maps a 64 MiB block afresh each time: every page faults again
    assert min(system["faults"][1:]) > PAGES // 2, system
    # reuse: the freed pages are handed out again, already mapped (glibc's heap still lands
    # a block on fresh pages now and then: seen 1 step in 4)
    faulting = [n for n in reuse["faults"][1:] if n > PAGES // 20]
    assert len(faulting) <= 3, reuse


@glibc_only
def test_train_applies_and_logs_reuse(tmp_path):
    solver = write_solver(tmp_path, max_iter=2, snapshot=0, test_interval=0, test_iter=None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--solver",
                           str(solver), "--allocator", "reuse", "--no-plot"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Allocator reuse: tensors below 1 GiB come from the heap" in proc.stderr
    assert "Optimization Done." in proc.stderr
