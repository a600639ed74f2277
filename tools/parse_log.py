#!/usr/bin/env python3
"""Parse a Caffe training log into two CSV files, as Caffe's tools/extra/parse_log.py does. (the installed ``parse_log`` command; ``parse_log --help``)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.parse_log_cli import *  # noqa: E402,F401,F403
from caffe_compat.commands.parse_log_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
