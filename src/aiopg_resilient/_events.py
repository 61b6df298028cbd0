"""PoolEvent and the one stream that the stats, the logs, the metrics and the user's
``on_event`` read.

Every connect (with its duration), failed connect, lost connection (with its cause),
retry, heartbeat and its failure, wait for a connection, in-doubt outcome, and down/up
transition is one `PoolEvent`. The counters of `PoolStats` and the pool's log lines
(connect failures, losses, down and up) are kept by reading the stream and nowhere
else; the in-doubt resolution logs its reasoning itself, with the transaction id.

Readers: ``on_event`` (given to the pool), and any number added later with
``pool.subscribe(fn)``, which returns the function that removes it again (the metrics
adapters of `aiopg_resilient.metrics` are such readers). Two kinds are per operation:
``acquire`` (every connection handed to a caller; ``duration`` is how long it waited)
and ``release`` (every borrow's end, given back, dropped or found dead; ``duration`` is
how long the caller held it). Only readers subscribed with ``per_operation=True`` get
them, and the pool makes them only while one is subscribed: a pool without such a
reader pays one attribute read per operation for them, nothing more. A reader gets a
borrow's ``release`` only if it got its ``acquire``.

A slow or failing reader never breaks the pool: its exceptions (any BaseException) are
logged and swallowed, except KeyboardInterrupt and SystemExit, which the event loop
raises right after; a coroutine function runs as a task of its own (at most 1,000
pending; more are dropped and counted).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import Failure, classify

__all__ = ["COUNTERS", "PER_OPERATION", "EventKind", "EventStream", "OnEvent", "PoolEvent"]

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
    "acquire",
    "release",
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

# Made only while a reader subscribed with per_operation=True (see the module doc).
PER_OPERATION = frozenset({"acquire", "release"})

_MAX_PENDING = 1000
_LOGGED = frozenset({"connect_failed", "lost", "down", "up"})


@dataclass(frozen=True)
class PoolEvent:
    """One thing that happened to a pool.

    *kind* is one of: ``connect``, ``connect_failed``, ``lost``, ``retry``,
    ``heartbeat``, ``heartbeat_failed``, ``acquire_wait`` (a caller had to wait for a
    connection), ``acquire_timeout``, ``commit_resolved``, ``commit_unknown``, ``down``,
    ``up``; and, only for readers subscribed with ``pool.subscribe(fn,
    per_operation=True)``, ``acquire`` (every connection handed to a caller) and
    ``release`` (every borrow's end: given back, dropped, or found dead).

    ``error`` is the error's class and libpq's message (never a password); ``duration``
    the seconds a connect took (``connect``), a caller waited (``acquire_wait``,
    ``acquire``, ``acquire_timeout``) or held its connection (``release``); ``xid`` and
    ``outcome`` describe an in-doubt commit (``"committed"``, ``"aborted"`` or
    ``"unknown"``).
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
_Reader = tuple[object, OnEvent, bool]
"""A subscription: its token, the reader, per operation or not."""


class EventStream:
    """Emits a pool's events to its counters, its log lines and its readers."""

    def __init__(
        self, pool: str, on_event: OnEvent | None, target: Callable[[], str] = str
    ) -> None:
        self.pool = pool
        self._target = target
        self.counters = dict.fromkeys(COUNTERS.values(), 0)
        self.dropped = 0
        self.last_error: str | None = None
        """The last failed connect or lost connection (class and message); never cleared."""
        self._pending: set[asyncio.Task[Any]] = set()
        self._readers: list[_Reader] = []
        self._all: tuple[OnEvent, ...] = ()
        self._per_op: tuple[OnEvent, ...] = ()
        self._per_op_entries: tuple[_Reader, ...] = ()
        self.per_op = False
        """A reader wants ``acquire``/``release``: the one attribute the per-operation
        path reads when none does."""
        # Review 11: each borrow remembers which readers got its acquire, and only those
        # (still subscribed) get its release: a reader subscribed mid-borrow used to get
        # a release for a borrow it never saw start (more releases than acquires).
        self._borrowed: dict[Hashable, tuple[float, tuple[_Reader, ...]]] = {}
        if on_event is not None:
            self.subscribe(on_event)

    def subscribe(self, fn: OnEvent, *, per_operation: bool = False) -> Callable[[], None]:
        """Add a reader of every later event; returns the function that removes it."""
        token = object()
        self._readers.append((token, fn, per_operation))
        self._readers_changed()

        def unsubscribe() -> None:
            self._readers = [r for r in self._readers if r[0] is not token]
            self._readers_changed()

        return unsubscribe

    def _readers_changed(self) -> None:
        # Tuples, replaced whole: a reader may unsubscribe while an event is delivered.
        self._all = tuple(fn for _, fn, _ in self._readers)
        self._per_op_entries = tuple(r for r in self._readers if r[2])
        self._per_op = tuple(fn for _, fn, _ in self._per_op_entries)
        self.per_op = bool(self._per_op)
        if not self.per_op:
            self._borrowed.clear()

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
        if self._all:
            self._send(
                self._all, PoolEvent(kind, self.pool, time.time(), duration, text, xid, outcome)
            )

    def borrowed(self, slot: Hashable, started: float) -> None:
        """*slot* went to a caller that asked for one at *started* (monotonic): an
        ``acquire`` event. Called only while `per_op` is true."""
        if not self.per_op:
            # Review 11: a caller that read the flag before waiting for a connection gets
            # one after the last per-operation reader left: nothing to track (a later
            # reader would get a release for a borrow it never saw start).
            return
        now = time.monotonic()
        self._borrowed[slot] = (now, self._per_op_entries)
        self._send(self._per_op, PoolEvent("acquire", self.pool, time.time(), now - started))

    def returned(self, slot: Hashable) -> None:
        """The borrow of *slot* ended (given back, dropped or found dead): a ``release``
        event, if `borrowed` saw it start, for the readers that got its ``acquire`` and
        are still subscribed. Called only while `per_op` is true."""
        entry = self._borrowed.pop(slot, None)
        if entry is not None:
            started, saw = entry
            current = self._per_op_entries
            readers = self._per_op if saw is current else tuple(r[1] for r in saw if r in current)
            held = time.monotonic() - started
            self._send(readers, PoolEvent("release", self.pool, time.time(), held))

    def _send(self, readers: tuple[OnEvent, ...], event: PoolEvent) -> None:
        for fn in readers:
            try:
                result = fn(event)
                if inspect.isawaitable(result):
                    self._schedule(result)
            except (KeyboardInterrupt, SystemExit) as exc:
                # Review 11: not raised here (mid-acquire, -release, -loss or -heartbeat it
                # leaked the connection in hand), nor swallowed: the loop raises it next,
                # as asyncio does with an interrupt in one of its own callbacks.
                _raise_soon(exc)
            except BaseException:
                # Review 11: any other BaseException too (a cancelled future's result(),
                # pytest.fail()...), which used to leak the connection in hand. A sync
                # reader cannot be where its caller is cancelled: it never awaits.
                logger.exception(
                    "pool %r: an event reader failed on a %r event; ignored", self.pool, event.kind
                )

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
        """The readers' coroutines still running (cancelled when the pool closes)."""
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
        if inspect.iscoroutine(awaitable):
            # Review 11: a task cancelled before it started (the pool closed just after
            # the event) never awaits the reader's coroutine, which then warned "never
            # awaited" at every shutdown. Closing a finished coroutine does nothing.
            task.add_done_callback(lambda _: awaitable.close())

    async def _guarded(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("pool %r: an event reader failed; ignored", self.pool)


def _raise_soon(exc: BaseException) -> None:
    """Raise *exc* from the running loop's next callback (at once without a loop)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise exc from None
    loop.call_soon(_reraise, exc)


def _reraise(exc: BaseException) -> None:
    raise exc
