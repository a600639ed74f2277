#!/usr/bin/env python3
"""``extract_features``: features of named blobs into LMDB/LevelDB ``Datum`` records.

See caffe_compat/commands/extract_features.py (also installed as the `extract_features` command).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.extract_features import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
