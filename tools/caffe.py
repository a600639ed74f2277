#!/usr/bin/env python3
"""Caffe's ``caffe`` tool from the checkout (train / test / time / device_query): the same
program as the installed ``caffe`` command. ``python tools/caffe.py --help`` lists them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.caffe_main import COMMANDS, parser  # noqa: E402,F401
from caffe_compat.commands.caffe_main import main as _main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="caffe.py")


if __name__ == "__main__":
    sys.exit(main())
