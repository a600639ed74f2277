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
