"""Hold back what a C library prints on stderr during one call, so it can become our own
log line instead of a raw one (libjpeg's "Premature end of JPEG file" names no file).

The C library writes to file descriptor 2 directly, so the descriptor itself is pointed at a
temporary file for the call. Other threads keep writing to fd 2 meanwhile: whatever the
library did not write is passed on to the real stderr afterwards, late but not lost. Calls
are serialized, so this is only for the rare call known to print (a JPEG found truncated).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

_LOCK = threading.Lock()


@contextlib.contextmanager
def c_stderr_lines(library_line: re.Pattern) -> Iterator[list[str]]:
    """Yield a list that, after the block, holds the stderr lines matching ``library_line``
    written during it; the other lines go on to stderr. Without a usable fd 2 (a daemon with
    it closed) nothing is held back."""
    said: list[str] = []
    with _LOCK, tempfile.TemporaryFile() as sink:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield said
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            passed_on = []
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                (said if library_line.match(line) else passed_on).append(line)
            said[:] = [line.strip() for line in said]
            if passed_on:
                os.write(2, "".join(passed_on).encode())
