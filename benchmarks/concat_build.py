"""Seconds to build a net whose Concat takes N copies of one bottom (issue 27).

Such a net is hostile but legal: the build inserts a Split with N tops and wires N bottoms.
The build once removed each consumed blob from a list (O(N) per removal, O(N²) in all:
100,000 copies took minutes); it now keeps them in an ordered dict. Each N is built in a
fresh process, so one size's memory does not slow the next.

    python benchmarks/concat_build.py [--copies 25000,50000,100000] [--repo OTHER_CHECKOUT]

``--repo`` times another checkout (e.g. ``git worktree add /tmp/before HEAD~1``), one size
after the other alternately with this one, for a before/after comparison on a busy machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_ONE = """
import sys, time
sys.path.insert(0, {repo!r})
from caffe_compat.engine.net.module import build_net
from caffe_compat.proto import caffe_pb2
net = caffe_pb2.NetParameter()
data = net.layer.add(name="d", type="Input", top=["data"])
data.input_param.shape.add(dim=[1, 1])
net.layer.add(name="c", type="Concat", top=["c"], bottom=["data"] * {copies})
start = time.perf_counter()
build_net(net, 1, source="concat_build")
print(f"{{time.perf_counter() - start:.2f}}")
"""


def build_seconds(copies: int, repo: Path = REPO) -> float:
    code = _ONE.format(repo=str(repo), copies=copies)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", default="25000,50000,100000",
                    help="comma-separated numbers of bottoms (default 25000,50000,100000)")
    ap.add_argument("--repo", type=Path, help="also time this other checkout (before/after)")
    args = ap.parse_args(argv)
    print("copies  build_s" + ("  other_s" if args.repo else ""))
    for copies in (int(c) for c in args.copies.split(",")):
        other = f"  {build_seconds(copies, args.repo):7.2f}" if args.repo else ""
        print(f"{copies:>6}  {build_seconds(copies):7.2f}{other}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
