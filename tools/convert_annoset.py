#!/usr/bin/env python3
"""convert_annoset from the checkout: the installed ``convert_annoset`` command (SSD's tool:
images + VOC XML boxes -> AnnotatedDatum LMDB). ``--help`` lists the flags."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.convert_annoset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
