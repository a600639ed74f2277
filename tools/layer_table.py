#!/usr/bin/env python3
"""Print README's supported-layer table from the layer registry.

Usage:
  layer_table.py            print the markdown table
  layer_table.py --write    replace the table in README.md (between its markers)
  layer_table.py --check    exit 1 when README.md's table differs from the registry
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caffe_compat.commands.layer_table import (REGENERATE, current_section,  # noqa: E402
                                               layer_table, readme_section, write_readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    if args.write:
        try:
            changed = write_readme(args.readme)
        except ValueError as exc:
            print(f"layer_table.py: {exc}", file=sys.stderr)
            return 1
        print(f"{args.readme}: {'table updated' if changed else 'already current'}")
        return 0
    if args.check:
        if current_section(args.readme.read_text(encoding="utf-8")) != readme_section():
            print(f"{args.readme}: the layer table differs from the registry; run {REGENERATE}",
                  file=sys.stderr)
            return 1
        return 0
    print(layer_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
