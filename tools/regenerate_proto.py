#!/usr/bin/env python3
"""Regenerate caffe_compat/proto/caffe_pb2.py from proto/caffe.proto.

    python tools/regenerate_proto.py          # rewrite the committed module
    python tools/regenerate_proto.py --check  # exit 1 if the committed module is stale

Runs `python -m grpc_tools.protoc -Iproto --python_out=caffe_compat/proto proto/caffe.proto`
from the repository root. The output depends on the protoc bundled with grpcio-tools: the
committed file was made with grpcio-tools 1.85.1 (libprotoc 35.1, gencode "Protobuf Python
Version 7.35.1"), which imports under any protobuf 7.x runtime >= 7.35.1 (tested with 7.36.2).
A different grpcio-tools may write a different header, which --check reports as stale.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("proto/caffe.proto")
OUTPUT = ROOT / "caffe_compat" / "proto" / "caffe_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc into `out_dir` and return the path of the generated caffe_pb2.py."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
           f"--python_out={out_dir}", str(PROTO)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"protoc failed ({' '.join(cmd)}):\n{result.stderr}")
    return out_dir / "caffe_pb2.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed caffe_pb2.py is out of date")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp)).read_bytes()
    rel = OUTPUT.relative_to(ROOT)
    if args.check:
        if OUTPUT.exists() and OUTPUT.read_bytes() == fresh:
            print(f"{rel} is up to date")
            return 0
        print(f"{rel} is out of date with {PROTO}; regenerate it with "
              f"`python tools/regenerate_proto.py`", file=sys.stderr)
        return 1
    OUTPUT.write_bytes(fresh)
    print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
