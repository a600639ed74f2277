#!/usr/bin/env python3
"""``classify``: Caffe's python/classify.py with a readable report.

See caffe_compat/commands/classify.py (also installed as the `classify` command).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.classify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
