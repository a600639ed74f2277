"""Alternating timing: every candidate runs once per round, so load drift hits all alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def alternate(candidates: dict[str, Callable[[], object]], iters: int, rounds: int,
              warmup: int = 1, prepare: dict[str, Callable[[], None]] | None = None
              ) -> dict[str, dict]:
    """Per candidate: the median ms of its best round (each round = ``iters`` calls).
    ``prepare[name]`` (untimed) runs before each of that candidate's rounds and warm-ups."""
    prepare = prepare or {}
    for name, fn in candidates.items():
        if name in prepare:
            prepare[name]()
        for _ in range(warmup):
            fn()
    per_round: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            if name in prepare:
                prepare[name]()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            per_round[name].append(statistics.median(times))
    return {k: {"ms": min(v), "rounds_ms": [round(x, 3) for x in v]}
            for k, v in per_round.items()}
