"""Small helpers shared by the command-line tools in ``tools/``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_TRUE, _FALSE = {"true", "1", "yes", "t", "y"}, {"false", "0", "no", "f", "n"}


def gflags_argv(argv: list[str], flags: set[str], bool_flags: set[str]) -> list[str]:
    """Accept Caffe's gflags spellings: ``-flag``, ``--flag=true|false`` and ``--noflag``."""
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            if arg[1:].split("=", 1)[0] in flags | {"no" + b for b in bool_flags}:
                arg = "-" + arg
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name in bool_flags and eq:
                if value.lower() in _TRUE:
                    arg = "--" + name
                elif value.lower() in _FALSE:
                    continue
            elif name.startswith("no") and name[2:] in bool_flags and not eq:
                continue
        out.append(arg)
    return out


def repo_root(tool_file: str) -> Path:
    """The checkout a tool runs from: the parent of its ``tools/`` folder."""
    return Path(tool_file).resolve().parents[1]


def shown(path: str | os.PathLike) -> str:
    """A path relative to the working directory when it is below it (for messages)."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:
        return str(path)


def say(message: str) -> None:
    """Print a progress line with absolute paths below the working directory shortened."""
    words = []
    for word in message.split(" "):
        core = word.rstrip(",;:)")
        words.append(shown(core) + word[len(core):] if os.path.isabs(core) else word)
    print(" ".join(words))


def fail(message: str, code: int = 1) -> int:
    """Print a one-line error to stderr and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code
