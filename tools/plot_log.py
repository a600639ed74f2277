#!/usr/bin/env python3
"""Plot a Caffe training log: smoothed training loss, test loss and test accuracy, to a PNG. (the installed ``plot_log`` command; ``plot_log --help``)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.plot_log_cli import *  # noqa: E402,F401,F403
from caffe_compat.commands.plot_log_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
