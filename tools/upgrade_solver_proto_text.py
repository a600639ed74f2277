#!/usr/bin/env python3
"""``upgrade_solver_proto_text IN OUT``: Caffe's tools/upgrade_solver_proto_text.cpp (see caffe_compat.commands.upgrade_proto).

See caffe_compat/commands/upgrade_solver_proto_text.py (also installed as the `upgrade_solver_proto_text` command).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.upgrade_solver_proto_text import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
