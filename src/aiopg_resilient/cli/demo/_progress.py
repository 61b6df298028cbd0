"""What the demo writes while it runs: lines, a live status line on a terminal, and the
library's log lines held back so that they never land in the middle of the output.

On a terminal the status line is rewritten in place (``\\r``); elsewhere (a pipe, a file,
CI) there is no status line and no ``\\r`` at all: only plain lines, one per event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TextIO

__all__ = ["CAPTURED_LOGGERS", "LogCapture", "Progress", "capture_logs"]

CAPTURED_LOGGERS = ("aiopg_resilient", "psycopg")
"""The loggers held back while the demo runs (``aiopg_resilient.*`` includes the pool, the
in-doubt resolution, the test server and the proxy)."""


class Progress:
    """Lines and a status line on `stream`; `live` (a terminal) rewrites the status in place."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self._shown = ""

    def line(self, text: str = "") -> None:
        """Write `text` as a line of its own (above the status line, on a terminal)."""
        shown = self._shown
        self.clear()
        self.stream.write(text + "\n")
        if shown:
            self.status(shown)
        self.stream.flush()

    def status(self, text: str) -> None:
        """Show `text` as the current status, in place, on a terminal; elsewhere nothing."""
        if not self.live:
            return
        pad = max(0, len(self._shown) - len(text))
        self.stream.write("\r" + text + " " * pad)
        self._shown = text
        self.stream.flush()

    def clear(self) -> None:
        """Remove the status line (a terminal only)."""
        if self.live and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.flush()
        self._shown = ""


class LogCapture(logging.Handler):
    """Holds the records of the captured loggers until `take` is called."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = " ".join(self.format(record).split())  # one line, even for libpq's texts
        except Exception:  # a broken record must not break the demo
            self.handleError(record)
            return
        with self.lock or contextlib.nullcontext():
            self._lines.append(line)

    def take(self) -> list[str]:
        """The lines held since the last call, oldest first; forgets them."""
        with self.lock or contextlib.nullcontext():
            lines, self._lines = self._lines, []
        return lines


@contextlib.contextmanager
def capture_logs(level: int) -> Iterator[LogCapture]:
    """Route the `CAPTURED_LOGGERS` (at `level` and above) into a `LogCapture` only, and
    restore them as they were on exit."""
    capture = LogCapture()
    saved = []
    for name in CAPTURED_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(capture)
        logger.setLevel(level)
        logger.propagate = False
    try:
        yield capture
    finally:
        for logger, old_level, propagate in saved:
            logger.removeHandler(capture)
            logger.setLevel(old_level)
            logger.propagate = propagate
