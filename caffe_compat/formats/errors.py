"""The project's error types for bad inputs; every one derives from ``CaffeCompatError``."""
from __future__ import annotations


class CaffeCompatError(ValueError):
    """Bad input the user can fix: a file, a definition, a flag. The message is one line that
    names the file (and line, record, layer or blob where known). Callers that must never see
    a library's raw error catch this one type."""


class DataError(CaffeCompatError):
    """A problem with an input file; the message is one line naming the file (and line)."""


class ResourceError(CaffeCompatError):
    """An input declares a size that the data present or the memory budget cannot hold."""


def with_context(message: str, *context: str) -> str:
    """``message`` prefixed with the parts of ``context`` ("net.prototxt", "layer 'data'
    (Data)") it does not already name, each followed by ": ".

    Every place that adds where-it-happened to an error message that may have come up
    through another such place uses this, so a message never says the same thing twice
    ("layer 'data' (Data): layer 'data' (Data): crop_size ...")."""
    message = str(message)
    parts = [part for part in context if part and part not in message]
    return ": ".join(parts + [message])


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's first non-blank line (its type's name when it has no message), cut to
    ``limit`` characters: runtimes and torch raise messages many lines long, a log line or
    an error naming a layer wants the first."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if limit is None else line[:limit]
