#!/usr/bin/env python3
"""compute_image_mean from the checkout: the installed ``compute_image_mean`` command, plus this repository's
no-argument mode (build the default data set the models read). ``--help`` lists the flags."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.common import fail, repo_root, say  # noqa: E402,F401
from caffe_compat.commands.compute_image_mean import main as _main  # noqa: E402
from caffe_compat.commands.compute_image_mean import *  # noqa: E402,F401,F403


def main(argv: list[str] | None = None) -> int:
    return _main(argv, defaults=default_means)


def default_means(args) -> int:
    repo = repo_root(__file__)
    from experiments.defaults import (DEFAULT_SIZES, DefaultPaths, build_dbs,
                                            build_mean, existing_sizes)
    for size in sorted(set(DEFAULT_SIZES) | set(existing_sizes(repo))):
        paths = DefaultPaths(repo, size)
        if not paths.train_db.exists():
            build_dbs(paths, report=say)
        build_mean(paths, report=say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
