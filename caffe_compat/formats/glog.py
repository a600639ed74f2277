"""The one logging system: stdlib ``logging``, written in Caffe's glog line format.

    I<MMDD> <HH:MM:SS.uuuuuu> <tid> <file>:<line>] <message>

Caffe's log parsers (tools/extra/parse_log.py, parse_log.sh, extract_seconds.py) split these
lines on whitespace, so the prefix is exactly four tokens: severity+month+day, local time with
microseconds, the thread id right-aligned to width 5, and ``file:line]``. Numbers are written
the way a C++ ``ostream`` writes them (``%g``: 6 significant digits), see ``num``.

Every module logs through ``logging.getLogger(__name__)`` (all under the ``caffe_compat``
logger); ``info(msg, "solver.cpp:243")`` is the shorthand for lines that carry Caffe's own
``file:line`` tag, so logs compare line by line with real Caffe's. Records of other modules get
their own ``module.py:line``. The ``caffe_compat`` logger writes to stderr (as pycaffe does; off
with ``set_stderr(False)``, or through ``set_echo`` e.g. ``tqdm.write`` under a progress bar) and
to every file added with ``add_log_file``. ``GLOG_minloglevel`` (0-3) drops lower severities,
as in glog.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
from typing import Callable

SEVERITIES = "IWEF"   # INFO, WARNING, ERROR, FATAL (glog's order and levels 0..3)
LOGGER = logging.getLogger("caffe_compat")
_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
                 logging.ERROR: "E", logging.CRITICAL: "F"}
_LETTER_LEVEL = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
                 "F": logging.CRITICAL}


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


class GlogFormatter(logging.Formatter):
    """A ``logging`` record as one glog line (without the trailing newline)."""

    def format(self, record: logging.LogRecord) -> str:
        where = getattr(record, "caffe_where", None) or \
            f"{os.path.basename(record.pathname)}:{record.lineno}"
        message = record.getMessage()
        if record.exc_info and not getattr(record, "caffe_where", None):
            message += "\n" + self.formatException(record.exc_info)
        now = datetime.datetime.fromtimestamp(record.created)
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        return format_line(message, where, letter, now, record.thread_native_id
                           if hasattr(record, "thread_native_id") else None).rstrip("\n")


class _MinLevel(logging.Filter):
    """glog's ``GLOG_minloglevel``, read at each record (tests and users change it live)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            minimum = int(os.environ.get("GLOG_minloglevel", "0"))
        except ValueError:
            minimum = 0
        return SEVERITIES.index(_LEVEL_LETTER.get(record.levelno, "I")) >= minimum


class _TerminalHandler(logging.Handler):
    """stderr (looked up at each record, so redirections apply), or the echo writer."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.echo: Callable[[str], None] | None = None
        self.enabled = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self.echo is not None:
                self.echo(text)
            elif self.enabled:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


class _FileHandler(logging.FileHandler):
    """A log file that is flushed at every line (a killed run keeps its log)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


_terminal = _TerminalHandler()
_terminal.setFormatter(GlogFormatter())


def _configure() -> None:
    """Configured once, at import: the package logger with its terminal handler."""
    if _terminal in LOGGER.handlers:
        return
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.addFilter(_MinLevel())
    LOGGER.addHandler(_terminal)
    LOGGER.propagate = False
    logging.captureWarnings(False)


_configure()


def log(message: str, where: str, severity: str = "I") -> None:
    """One glog line with Caffe's ``file.cpp:line`` tag, to stderr and the log files."""
    LOGGER.log(_LETTER_LEVEL[severity], message, extra={"caffe_where": where}, stacklevel=3)


def info(message: str, where: str) -> None:
    log(message, where, "I")


def warning(message: str, where: str) -> None:
    log(message, where, "W")


def error(message: str, where: str) -> None:
    log(message, where, "E")


def add_log_file(path: str, header: bool = False) -> logging.Handler:
    """Append every following line to ``path`` too (created if needed); returns the handler.

    With ``header``, glog's three header lines are written first (as a new glog file has).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if header:
        import socket
        now = datetime.datetime.now()
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"Log file created at: {now:%Y/%m/%d %H:%M:%S}\n"
                    f"Running on machine: {socket.gethostname()}\n"
                    "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg\n")
    handler = _FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(GlogFormatter())
    LOGGER.addHandler(handler)
    return handler


def remove_log_file(handler: logging.Handler) -> None:
    LOGGER.removeHandler(handler)
    handler.close()


def set_stderr(enabled: bool) -> None:
    """Turn the stderr copy of the log on or off (log files are unaffected)."""
    _terminal.enabled = bool(enabled)


def set_echo(writer: Callable[[str], None] | None) -> None:
    """Send the terminal copy of each line through ``writer`` (e.g. ``tqdm.write``); None resets."""
    _terminal.echo = writer


def echo() -> Callable[[str], None] | None:
    return _terminal.echo


def stderr_enabled() -> bool:
    """Whether the terminal copy of the log is on (``set_stderr``)."""
    return _terminal.enabled
