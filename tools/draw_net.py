#!/usr/bin/env python3
"""Draw a net's layer graph as a PNG with matplotlib (no graphviz needed). (the installed ``draw_net`` command; ``draw_net --help``)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.draw_net import *  # noqa: E402,F401,F403
from caffe_compat.commands.draw_net import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
