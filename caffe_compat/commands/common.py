"""What every command shares: Caffe's flag spellings, one-line errors, --debug, paths in
messages (the one CLI helper module; ``tools/*.py`` use it too)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

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



class CliError(Exception):
    """A usage error the command reports as one line (exit status 1)."""


def caffe_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept gflags spellings (``-solver x``, ``--weights=x``, ``--debug=true``) for the
    parser's long options."""
    flags, bools = set(), set()
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                name = opt[2:]
                flags.add(name)
                if action.nargs == 0:
                    bools.add(name)
    return gflags_argv(list(argv), flags, bools)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on error, print the Python traceback too (default: one line)")


def one_line(exc: BaseException) -> str:
    """The message of an exception on one line. The project's errors (and OSError's) already
    name the file, line and fix; other exception types get their type name in front."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    if not _expected(exc) and not type(exc).__module__.startswith("caffe_compat"):
        text = f"{type(exc).__name__}: {text}"
    return text


def run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace,
        prog: str) -> int:
    """Call ``main(args)``; turn any exception into ``<prog>: error: <one line>`` + status 1
    (KeyboardInterrupt: status 130). ``args.debug`` adds the traceback."""
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's job is to report any failure cleanly
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        if not getattr(args, "debug", False) and not _expected(exc):
            print(f"{prog}: (unexpected error; run with --debug for the traceback)",
                  file=sys.stderr)
        return 1


def _expected(exc: BaseException) -> bool:
    """Errors whose message is the whole story (bad input), as opposed to a bug."""
    return isinstance(exc, (CliError, ValueError, OSError, RuntimeError, KeyError))




def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine`` (engine/backends/engine.py) and ``--threads`` (engine/numerics.py)."""
    from caffe_compat.engine.backends import ENGINES
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="inference engine for nets fed by Input layers: torch (default, "
                             "or $CAFFE_COMPAT_ENGINE), onnxruntime, openvino, or auto (the "
                             "fastest here whose outputs equal torch's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default $CAFFE_COMPAT_THREADS, else the CPUs the "
                             "load average shows idle)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set the thread count ``--threads`` asks for (a non-positive count is an error)."""
    if getattr(args, "threads", None) is not None:
        from caffe_compat.engine.numerics import configure_threads, parse_threads
        configure_threads(parse_threads(args.threads, "--threads"))


__all__ = ["CliError", "caffe_argv", "add_debug_flag", "one_line", "run", "gflags_argv",
           "repo_root", "shown", "say", "fail", "add_engine_arguments", "apply_threads"]
