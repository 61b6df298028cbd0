"""PoolEvent and the one stream that the stats, and the user's ``on_event``, read.

Every connect (with its duration), failed connect, lost connection (with its cause),
retry, heartbeat and its failure, wait for a connection, in-doubt outcome, and down/up
transition is one `PoolEvent`. The counters of `PoolStats` and the pool's log lines
(connect failures, losses, down and up) are kept by reading the stream and nowhere
else; the in-doubt resolution logs its reasoning itself, with the transaction id. A slow
or failing ``on_event`` never breaks the pool: its exceptions are logged and swallowed,
and a coroutine function runs as a task of its own (at most 1,000 pending; more are
dropped and counted).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import Failure, classify

__all__ = ["COUNTERS", "EventKind", "EventStream", "OnEvent", "PoolEvent"]

logger = logging.getLogger("aiopg_resilient.pool")

EventKind = Literal[
    "connect",
    "connect_failed",
    "lost",
    "retry",
    "heartbeat",
    "heartbeat_failed",
    "acquire_wait",
    "acquire_timeout",
    "commit_resolved",
    "commit_unknown",
    "down",
    "up",
]

# The PoolStats counter each kind of event counts.
COUNTERS: dict[str, str] = {
    "connect": "connects",
    "connect_failed": "connect_failures",
    "lost": "connections_lost",
    "retry": "retries",
    "heartbeat": "heartbeats",
    "heartbeat_failed": "heartbeat_failures",
    "acquire_timeout": "acquire_timeouts",
    "commit_resolved": "commits_resolved",
    "commit_unknown": "commits_unknown",
}

_MAX_PENDING = 1000
_LOGGED = frozenset({"connect_failed", "lost", "down", "up"})


@dataclass(frozen=True)
class PoolEvent:
    """One thing that happened to a pool (see the module doc for the kinds).

    ``error`` is the error's class and libpq's message (never a password); ``duration``
    the seconds a connect or a wait took; ``xid`` and ``outcome`` describe an in-doubt
    commit (``"committed"``, ``"aborted"`` or ``"unknown"``).
    """

    kind: EventKind
    pool: str
    at: float
    """Wall-clock time (``time.time()``)."""
    duration: float | None = None
    error: str | None = None
    xid: int | None = None
    outcome: str | None = None


PoolEvent.__module__ = "aiopg_resilient"

OnEvent = Callable[[PoolEvent], None] | Callable[[PoolEvent], Awaitable[None]]


class EventStream:
    """Emits a pool's events to its counters and to the user's callback."""

    def __init__(
        self, pool: str, on_event: OnEvent | None, target: Callable[[], str] = str
    ) -> None:
        self.pool = pool
        self.on_event = on_event
        self._target = target
        self.counters = dict.fromkeys(COUNTERS.values(), 0)
        self.dropped = 0
        self.last_error: str | None = None
        """The last failed connect or lost connection (class and message); never cleared."""
        self._pending: set[asyncio.Task[Any]] = set()

    def emit(
        self,
        kind: EventKind,
        *,
        duration: float | None = None,
        error: BaseException | None = None,
        xid: int | None = None,
        outcome: str | None = None,
    ) -> None:
        counter = COUNTERS.get(kind)
        if counter is not None:
            self.counters[counter] += 1
        if kind in _LOGGED:
            self._log(kind, error)
        text = None if error is None else f"{type(error).__name__}: {error}"
        if text is not None and kind in ("connect_failed", "lost"):
            self.last_error = text
        if self.on_event is None:
            return
        event = PoolEvent(kind, self.pool, time.time(), duration, text, xid, outcome)
        try:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                self._schedule(result)
        except Exception:
            logger.exception("pool %r: on_event failed on a %r event; ignored", self.pool, kind)

    def _log(self, kind: EventKind, error: BaseException | None) -> None:
        """The pool's log lines are one more reader of the stream."""
        target = self._target()
        if kind == "connect_failed":
            level = (
                logging.ERROR
                if classify(error or Exception()) is Failure.FATAL
                else logging.WARNING
            )
            logger.log(level, "pool %r: connect to %s failed: %s", self.pool, target, error)
        elif kind == "lost":
            logger.warning("pool %r: lost a connection to %s: %s", self.pool, target, error)
        elif kind == "down":
            logger.warning("pool %r: %s is unreachable: %s", self.pool, target, error)
        elif kind == "up":
            logger.info("pool %r: %s is reachable again", self.pool, target)

    def pending(self) -> list[asyncio.Task[Any]]:
        """The ``on_event`` coroutines still running (cancelled when the pool closes)."""
        return list(self._pending)

    def _schedule(self, awaitable: Awaitable[None]) -> None:
        if len(self._pending) >= _MAX_PENDING:
            self.dropped += 1
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            return
        task = asyncio.ensure_future(self._guarded(awaitable))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _guarded(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("pool %r: on_event failed; ignored", self.pool)
