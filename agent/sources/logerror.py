"""The one error a log that cannot be read at all raises (agent/sources/logfile.py has the contract)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class LogUnreadable(ValueError):
    """A log with no frame to give; the text names the file and says why, on one line."""


def why(e: BaseException) -> str:
    """An exception in a few words: its type (whose, for struct.error and zlib.error) and its text, one line."""
    name = type(e).__name__
    if name == "error":  # struct.error, zlib.error: say whose
        name = f"{type(e).__module__}.error"
    text = " ".join(str(e).split())
    return f"{name}: {text[:160]}" if text else name


@contextmanager
def no_cleanup_noise() -> Iterator[None]:
    """asammdf's MDF4.__del__ fails on an object whose __init__ failed and prints that as "Exception ignored ...
    Traceback": the file's failure is already reported (LogUnreadable), its half-built reader's is not news."""
    old = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = old
