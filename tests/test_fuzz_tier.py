"""The bounded fuzz tier: every reader, mutated inputs, one invariant (issue 12).

Every input either loads or raises the project's CaffeCompatError with a one-line message
naming the file (or the layer); never another exception, a crash, a hang or an allocation
beyond the worker's address-space limit. Inputs are read in a worker process (see
fuzz_harness.py), so a crash fails the test instead of killing pytest. Hypothesis runs
derandomized with a fixed number of examples; tests/fuzz_corpus/ holds the reproducers of
bugs found so far, replayed every run. The long form: tools/fuzz.py --inputs 20000.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_harness import OK, Pool, mutate, new_folder, seeds_in, write_input
from fuzz_seeds import READERS, TEXT_FORMATS

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
EXAMPLES = 8


@pytest.fixture(scope="module")
def fuzz_env():
    folder = new_folder()
    seeds = seeds_in(folder)
    pool = Pool(folder, timeout=60)
    yield folder, seeds, pool
    pool.close()
    shutil.rmtree(folder, ignore_errors=True)


def _check(pool: Pool, fmt: str, path: str) -> None:
    outcome, detail = pool.run(fmt, path)
    assert outcome in OK, f"{fmt} input {path}: {outcome}: {detail}"


def test_every_seed_loads(fuzz_env):
    """The unmutated seeds load: a reader that refuses everything would pass the invariant."""
    folder, seeds, pool = fuzz_env
    assert set(seeds) == set(READERS)
    for fmt, items in seeds.items():
        for i, data in enumerate(items):
            outcome, detail = pool.run(fmt, write_input(folder, fmt, 10_000 + i, data))
            assert outcome == "loaded", f"seed of {fmt}: {outcome}: {detail}"


@pytest.mark.parametrize("fmt", sorted(READERS))
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choice=st.integers(0, 7), mutation_seed=st.integers(0, 2**32 - 1))
def test_mutated_inputs_load_or_fail_cleanly(fuzz_env, fmt, choice, mutation_seed):
    folder, seeds, pool = fuzz_env
    seed = seeds[fmt][choice % len(seeds[fmt])]
    data = mutate(seed, random.Random(mutation_seed), fmt in TEXT_FORMATS)
    _check(pool, fmt, write_input(folder, fmt, mutation_seed % 100_000, data))


def _corpus() -> list[Path]:
    return sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_corpus_is_not_empty():
    assert len(_corpus()) >= len(READERS), "tests/fuzz_corpus/ lost its reproducers"


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_replays_cleanly(fuzz_env, path):
    """Each kept reproducer (folder = format) still loads or fails with a clean error."""
    folder, _, pool = fuzz_env
    fmt = path.parent.name
    assert fmt in READERS, f"corpus folder {fmt} is not a fuzzed format"
    target = write_input(folder, fmt, abs(hash(path.name)) % 100_000, path.read_bytes())
    _check(pool, fmt, target)
