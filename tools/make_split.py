#!/usr/bin/env python3
"""Split an image folder tree into Caffe train/test lists: N images per class each. (the installed ``make_split`` command; ``make_split --help``)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.make_split import *  # noqa: E402,F401,F403
from caffe_compat.commands.make_split import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
