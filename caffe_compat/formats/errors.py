"""The one exception type for bad data inputs (files, lists, databases, means)."""
from __future__ import annotations


class DataError(ValueError):
    """A problem with an input file; the message is one line naming the file (and line)."""
