#!/usr/bin/env python3
"""Release check: fuzz every reader with many mutated inputs (the long form of the fuzz tier).

Usage:
  fuzz.py [--inputs 20000] [--seed 0] [--formats a,b] [--keep DIR] [--json FILE]
Mutates the seed files of tests/fuzz_seeds.py (bit flips, truncation, inserted bytes,
duplicated lines, huge or negative numbers), reads each input in a worker process and
prints, per format: tried / loaded / clean error / raw error / crash / hang / memory.
Inputs that break the invariant (anything but loaded or a clean error) are copied to --keep
(default fuzz_findings/) for tests/fuzz_corpus/. Exit status 1 when there is any.
Run it niced on a shared machine: nice -n 19 python tools/fuzz.py --inputs 20000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from fuzz_harness import OK, Pool, mutate, new_folder, seeds_in, write_input  # noqa: E402
from fuzz_seeds import TEXT_FORMATS  # noqa: E402

COLUMNS = ("loaded", "clean", "raw", "crash", "hang", "memory")


def run(total: int, seed: int, formats: list[str] | None, keep: Path) -> dict:
    folder = new_folder()
    seeds = seeds_in(folder)
    names = formats or sorted(seeds)
    rng = random.Random(seed)
    pool = Pool(folder)
    counts = {f: Counter() for f in names}
    start = time.time()
    try:
        for i in range(total):
            fmt = names[i % len(names)]
            data = mutate(rng.choice(seeds[fmt]), rng, fmt in TEXT_FORMATS)
            path = write_input(folder, fmt, i, data)
            outcome, detail = pool.run(fmt, path)
            counts[fmt][outcome] += 1
            if outcome not in OK:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, keep / os.path.basename(path))
                print(f"{outcome}: {fmt} {os.path.basename(path)}: {detail}", flush=True)
            os.remove(path)
            if (i + 1) % 500 == 0:
                print(f"... {i + 1}/{total} inputs, {time.time() - start:.0f} s", flush=True)
    finally:
        pool.close()
        shutil.rmtree(folder, ignore_errors=True)
    return {f: dict(counts[f], tried=sum(counts[f].values())) for f in names}


def table(report: dict) -> str:
    lines = ["format            tried " + " ".join(f"{c:>7}" for c in COLUMNS)]
    for fmt, c in report.items():
        lines.append(f"{fmt:<16} {c['tried']:>6} " + " ".join(f"{c.get(k, 0):>7}" for k in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=20000, help="inputs in all (default 20000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--formats", default="", help="comma-separated subset of formats")
    ap.add_argument("--keep", default="fuzz_findings", help="where failing inputs are copied")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.inputs < 1:
        print("error: --inputs must be >= 1", file=sys.stderr)
        return 2
    formats = [f for f in args.formats.split(",") if f] or None
    report = run(args.inputs, args.seed, formats, Path(args.keep))
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True))
    bad = sum(c.get(k, 0) for c in report.values() for k in COLUMNS if k not in OK)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
