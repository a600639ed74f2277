"""The process-wide random seed (Caffe's `random_seed` / caffe.set_random_seed).

Fillers use torch's global generator; data layers derive their shuffling and crop/mirror
generators from ``get_seed()`` so a seeded run is reproducible end to end.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_seed: int | None = None


def set_seed(seed: int) -> None:
    """Seed torch, numpy and Python's RNGs and remember the seed for data layers."""
    global _seed
    _seed = int(seed)
    torch.manual_seed(_seed)
    np.random.seed(_seed % (2 ** 32))
    random.seed(_seed)


def get_seed() -> int | None:
    """The last seed given to ``set_seed``, or None when the run is unseeded."""
    return _seed
