#!/usr/bin/env python3
"""Add Caffe's ten-crop test (classify.py --oversample) to a finished full Fashion-MNIST report.

The experiment lives in experiments/oversample_report.py (``--help`` there and here is the
same); this script runs it from the checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.oversample_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
