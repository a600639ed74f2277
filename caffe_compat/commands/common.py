"""What every command shares: Caffe's flag spellings, one-line errors, --debug."""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from caffe_compat.commands.tool_args import gflags_argv


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


__all__ = ["CliError", "caffe_argv", "add_debug_flag", "one_line", "run"]
