#!/usr/bin/env python3
"""Scale benchmark: a model (default vgg16_landmark_64) on the full Fashion-MNIST (60k/10k).

The experiment lives in experiments/full_fashion_mnist.py (``--help`` there and here is the
same); this script runs it from the checkout.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.full_fashion_mnist import (REPO, Curve, clamp, main,  # noqa: E402,F401
                                            parse_args, solver_param, test_once, train)

if __name__ == "__main__":
    sys.exit(main())
