"""Caffe's glog lines: ``I<MMDD> <HH:MM:SS.uuuuuu> <tid> <file>:<line>] <message>``.

Caffe's log parsers (tools/extra/parse_log.py, parse_log.sh, extract_seconds.py) split these
lines on whitespace, so the prefix is exactly four tokens: severity+month+day, local time with
microseconds, the thread id right-aligned to width 5, and ``file:line]``. Numbers are written
the way a C++ ``ostream`` writes them (``%g``: 6 significant digits), see ``num``.

Lines go to stderr (unless silenced, or ``GLOG_minloglevel`` is above the severity, as with
glog) and to every file added with ``add_log_file``. ``set_echo`` replaces the stderr writer,
for example with ``tqdm.write`` so a progress bar and the log lines do not interleave.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
from typing import Callable, TextIO

SEVERITIES = "IWEF"   # INFO, WARNING, ERROR, FATAL (glog's order and levels 0..3)

_files: list[TextIO] = []
_echo: Callable[[str], None] | None = None
_stderr = True
_lock = threading.Lock()


def num(value) -> str:
    """A number as C++ ``ostream <<`` prints it: ints as ints, floats with ``%g``."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return "%g" % float(value)


def prefix(severity: str = "I", where: str = "solver.cpp:0",
           now: datetime.datetime | None = None, tid: int | None = None) -> str:
    now = now or datetime.datetime.now()
    tid = threading.get_native_id() if tid is None else tid
    return (f"{severity}{now:%m%d} {now:%H:%M:%S}.{now.microsecond:06d} {tid:5d} {where}] ")


def format_line(message: str, where: str, severity: str = "I",
                now: datetime.datetime | None = None, tid: int | None = None) -> str:
    """The full text glog writes for ``message`` (only the first line gets the prefix; a
    newline is added unless the message already ends with one, as glog does)."""
    end = "" if message.endswith("\n") else "\n"
    return prefix(severity, where, now, tid) + message + end


def _min_level() -> int:
    try:
        return int(os.environ.get("GLOG_minloglevel", "0"))
    except ValueError:
        return 0


def log(message: str, where: str, severity: str = "I") -> None:
    """Write one glog line (``where`` is Caffe's ``file.cpp:line``) to stderr and log files."""
    if SEVERITIES.index(severity) < _min_level():
        return
    text = format_line(message, where, severity)
    with _lock:
        for f in _files:
            f.write(text)
            f.flush()
        if _echo is not None:
            _echo(text.rstrip("\n"))
        elif _stderr:
            sys.stderr.write(text)
            sys.stderr.flush()


def info(message: str, where: str) -> None:
    log(message, where, "I")


def warning(message: str, where: str) -> None:
    log(message, where, "W")


def error(message: str, where: str) -> None:
    log(message, where, "E")


def add_log_file(path: str) -> TextIO:
    """Append every following line to ``path`` too (created if needed); returns the file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    f = open(path, "a", encoding="utf-8")
    with _lock:
        _files.append(f)
    return f


def remove_log_file(f: TextIO) -> None:
    with _lock:
        if f in _files:
            _files.remove(f)
    f.close()


def set_stderr(enabled: bool) -> None:
    """Turn the stderr copy of the log on or off (log files are unaffected)."""
    global _stderr
    _stderr = bool(enabled)


def set_echo(writer: Callable[[str], None] | None) -> None:
    """Send the terminal copy of each line through ``writer`` (e.g. ``tqdm.write``); None resets."""
    global _echo
    _echo = writer
