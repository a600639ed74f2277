#!/usr/bin/env python3
"""Landmark error (pixels) of a trained net's heatmaps vs a mean-position baseline, and a PNG.

The evaluation lives in experiments/landmark_eval.py (``--help`` there and here is the same);
this script runs it from the checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.landmark_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
