"""Multiplexed reads: reads in flight together share connections in pipeline mode.

With ``multiplex=True``, reads (`fetch`, `fetchone`, `fetchval`) beyond those that take
the direct path (a connection each, as without it) are queued. A few driver tasks
(``drivers``: half of ``max_size``, at least one) each borrow a connection as any caller
does and send queued reads as one pipeline: every statement, then one Sync, one round
trip for the lot; each caller then gets its own answer. Writes, blocks and LISTEN never
come here, nor a read made inside a block (it keeps the block's own rules).

How much is shared follows how long the reads take (a moving average of the time per
statement of each batch; a direct read's time is mostly its wait under load, not its
cost, and is not counted):

- short reads (under `SHORT`, the usual point lookups): only a read alone goes direct,
  and a driver sends everything queued at once: the fewest round trips and connections;
- long reads, or before any read has been timed: up to ``max_size - drivers`` reads go
  direct, and a driver sends its share of the queue (the queue over the drivers), so
  long reads run side by side on several connections instead of one after another on
  one (the server runs a pipeline's statements in order).

Every guarantee of a read holds (the README, "Multiplexed reads", lists how): a read
in a batch whose connection is lost is replayed through its caller's own budget; a
statement's error reaches its caller only, the others in its batch are sent again (see
`_pipeline`); a caller gone before its statement is sent leaves the queue, after it its
answer is thrown away, and a batch all of whose callers are gone is abandoned as a
direct read is; a queued read waits as long as a direct one would, then hears why; a
driver gives its connection back between batches when another caller waits for one or
the connection is past its lifetime; ``stats.waiting`` counts queued reads, not drivers.
A driver whose batch is held up by a long read (over `_STUCK`) gets company.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._attempts import Attempts
from ._driver import DriverConnection
from ._errors import Failure, PoolClosed, PoolTimeout, classify
from ._events import EventStream
from ._failures import failure_of
from ._pipeline import Again, Batch, Request, copy_error, settle, several
from ._retry import RetryPolicy
from ._slots import gave_up
from ._source import Slot
from ._statement import Statement

__all__ = ["Multiplexer"]

logger = logging.getLogger("aiopg_resilient.pool")

T = TypeVar("T")

_MAX_BATCH = 128
SHORT = 0.001
"""Seconds per statement under which reads count as short (see `Multiplexer.short`)."""
_PER_DRIVER = 32
"""Short reads: one driver per this many queued reads (one round trip carries them)."""
_STUCK = 0.05
"""Seconds after which a driver's batch counts as held up by a long read (`_start_driver`)."""
"""Short reads: one driver per this many queued reads (one round trip carries them)."""

Watch = Callable[[DriverConnection, Any, Callable[[], int]], Coroutine[Any, Any, Any]]


class Multiplexer:
    """Queues concurrent reads and sends them in pipelines (see the module doc)."""

    def __init__(
        self,
        pool: Any,
        *,
        retry: RetryPolicy,
        rng: random.Random,
        events: EventStream,
        watch: Watch,
        direct: Callable[[Statement[Any]], Coroutine[Any, Any, Any]],
        holding: Callable[[], bool],
    ) -> None:
        self._pool = pool
        self._retry = retry
        self._rng = rng
        self._events = events
        self._watch = watch
        self._direct_read = direct
        self._holding = holding
        self.drivers: int = max(1, pool.max_size // 2)
        self.direct_limit: int = max(1, pool.max_size - self.drivers)
        self._queue: deque[Request] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._acquiring: set[asyncio.Task[None]] = set()
        self._busy: dict[asyncio.Task[None], tuple[list[Request], float]] = {}
        """Drivers mid-batch: their batch, and when they sent it."""
        self._recheck: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._direct = 0
        self._cost: float | None = None
        """Seconds per statement of the batches so far (a moving average); None: not
        known yet, taken as long."""

    @property
    def queued(self) -> int:
        """Reads waiting for a batch (sent ones are not counted)."""
        return len(self._queue)

    async def read(self, stmt: Statement[T]) -> T:
        """*stmt*'s answer: on a connection of its own while few reads are in flight (or
        inside a block), else in a pipeline."""
        limit = 1 if self.short else self.direct_limit
        if (not self._queue and self._direct < limit) or self._holding() or several(stmt):
            self._direct += 1
            try:
                return await self._direct_read(stmt)  # type: ignore[no-any-return]
            finally:
                self._direct -= 1
        return await self._queued(stmt)

    @property
    def short(self) -> bool:
        """The reads so far were short (under `SHORT` each on average): pipelining
        them saves round trips and costs no one much. Long reads spread out instead."""
        return self._cost is not None and self._cost < SHORT

    def close(self) -> None:
        """The pool closes: every queued read gets `PoolClosed`, no driver waits on.
        Batches in flight are answered (as direct reads in flight are)."""
        self._fail_all(PoolClosed(f"pool {self._pool.name!r} was closed"))
        for task in self._acquiring:
            task.cancel()

    async def _queued(self, stmt: Statement[T]) -> T:
        attempts = Attempts(self._retry, self._rng)
        attempts.count = 1
        unexplained = False
        loop = asyncio.get_running_loop()
        while True:
            if self._pool._closed:
                raise PoolClosed(f"pool {self._pool.name!r} is closed")
            now = time.monotonic()
            request = Request(stmt, attempts, now, loop.create_future())
            self._queue.append(request)
            self._start_driver()
            if self._watchdog is None:
                self._arm(now)
            try:
                outcome = await request.future
            except BaseException:
                self._forget(request)
                raise
            if not isinstance(outcome, Again):
                return outcome  # type: ignore[no-any-return]
            if outcome.direct or (outcome.unexplained and unexplained):
                # Twice unexplained: on a connection of its own, it meets its own fate.
                return await self._direct_read(stmt)  # type: ignore[no-any-return]
            unexplained = unexplained or outcome.unexplained
            if outcome.backoff:
                self._events.emit("retry", error=outcome.error)
                await attempts.again(outcome.error)
                attempts.count += 1

    def _forget(self, request: Request) -> None:
        """*request*'s caller is gone (cancelled, or failed while queued)."""
        request.future.cancel()  # a batch in flight throws its answer away
        with contextlib.suppress(ValueError):
            self._queue.remove(request)
        for task, (batch, _) in self._busy.items():
            if request in batch and all(r.future.done() for r in batch):
                # Every caller of a batch in flight is gone: abandon it as a direct read
                # is (the query cancelled, the connection dropped), not let it run on.
                task.cancel()
        if not self._queue:
            for task in self._acquiring:
                task.cancel()  # waiting for a connection for nobody

    def _start_driver(self) -> None:
        if self._pool._closed:
            return
        running = len(self._running)
        if running >= self.drivers:
            return
        # A driver whose batch has been out longer than _STUCK (a long read in it) will
        # not be back soon: reads queued meanwhile get another driver, not wait for it.
        now = time.monotonic()
        if running - self._stuck(now) >= self._wanted():
            if self._busy and self._recheck is None:
                first = min(sent for _, sent in self._busy.values())
                loop = asyncio.get_running_loop()
                self._recheck = loop.call_later(first + _STUCK - now, self._rechecked)
            return
        # A context of its own: nothing of the caller's (the blocks it runs in, a login's
        # bookkeeping) may leak into a task that serves every caller.
        task = contextvars.Context().run(asyncio.ensure_future, self._drive())
        self._running.add(task)

    async def _drive(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while self._queue and not self._pool._closed and not self._surplus():
                head = self._queue[0]
                self._acquiring.add(task)
                try:
                    slot = await self._pool._acquire(head.attempts.deadline, since=head.since)
                except Exception as exc:
                    self._expire(head, exc)
                    continue
                finally:
                    self._acquiring.discard(task)
                await self._serve(slot)
        finally:
            self._running.discard(task)
            if self._queue:
                if self._pool._closed:
                    self._fail_all(PoolClosed(f"pool {self._pool.name!r} was closed"))
                else:
                    self._start_driver()

    def _expire(self, head: Request, exc: Exception) -> None:
        """No connection came for *head* (``PoolTimeout``, `DatabaseUnavailable`, a
        configuration error, ``PoolClosed``): it hears why, and so does every other
        queued read whose own wait is over; the rest queue on."""
        if isinstance(exc, PoolClosed):
            self._fail_all(exc)
            return
        now = time.monotonic()
        pool = self._pool
        down = pool._server.down
        for request in list(self._queue):
            due = request.attempts.deadline
            if not down:
                due = min(due, request.since + pool.acquire_timeout)
            if request is head or now >= due:
                self._queue.remove(request)
                if isinstance(exc, PoolTimeout) and not request.future.done():
                    pool._events.emit("acquire_timeout", duration=now - request.since)
                settle(request, exc=exc if request is head else copy_error(exc))

    async def _serve(self, slot: Slot) -> None:
        """Send batches on *slot* while reads are queued; give it back."""
        batch: list[Request] = []
        try:
            while True:
                if not self._queue:
                    # The callers just answered run now: their next reads join this
                    # connection's next batch instead of waking a new driver.
                    await asyncio.sleep(0)
                if not self._queue or self._surplus() or self._yields(slot):
                    break
                batch = self._take()
                started = time.monotonic()
                task = asyncio.current_task()
                assert task is not None
                self._busy[task] = (batch, started)
                try:
                    await self._watch(slot.conn, Batch(batch), lambda: 0)
                except Exception as exc:
                    # In pipeline mode the connection's state is unknown after anything
                    # the batch did not settle: never used again, and the reads replayed.
                    lost = await failure_of(slot.conn, exc) is not None
                    lost = lost or classify(exc) is Failure.CONNECTION
                    if not lost:
                        logger.warning(
                            "pool %r: a pipelined batch of %d reads failed (%s: %s); its "
                            "connection is dropped and the reads are sent again",
                            self._pool.name,
                            len(batch),
                            type(exc).__name__,
                            exc,
                        )
                    for request in batch:
                        again = Again(copy_error(exc), unexplained=not lost)
                        settle(request, again=again)
                    await (self._pool._lost(slot, exc) if lost else self._pool._discard(slot))
                    return
                finally:
                    self._busy.pop(task, None)
                self._learn((time.monotonic() - started) / len(batch))
                batch = []
        except BaseException as exc:
            for request in batch:  # cancelled mid-batch (the loop is going away)
                settle(request, again=Again(exc, backoff=False))
            await self._pool._discard(slot)  # its state is unknown
            raise
        await self._pool._release(slot)

    def _rechecked(self) -> None:
        self._recheck = None
        if self._queue:
            self._start_driver()

    def _wanted(self) -> int:
        """How many drivers the queue needs: short reads, one per `_PER_DRIVER` queued
        (one round trip carries them all, and more drivers would only split batches);
        long ones, one per queued read."""
        queued = len(self._queue)
        return -(-queued // _PER_DRIVER) if self.short else queued

    def _learn(self, cost: float) -> None:
        previous = self._cost
        self._cost = cost if previous is None else previous + (cost - previous) / 4

    def _surplus(self) -> bool:
        """Short reads, and more drivers run than the queue wants: this one gives its
        connection back (with long reads, every driver with a connection takes a share)."""
        running = len(self._running) - self._stuck(time.monotonic())
        return self.short and running > max(1, min(self.drivers, self._wanted()))

    def _stuck(self, now: float) -> int:
        """Drivers whose batch has been out longer than `_STUCK`: not coming back soon."""
        return sum(1 for _, sent in self._busy.values() if now - sent >= _STUCK)

    def _yields(self, slot: Slot) -> bool:
        """Give the connection back between batches, as every borrower does: a caller
        that is not a driver waits for one (a write, a block: no starving them), or the
        connection is past its lifetime."""
        pool = self._pool
        if slot.expires is not None and time.monotonic() >= slot.expires:
            return True
        proxies = pool._proxies
        return any(w not in proxies for w in pool._waiters)

    def _due(self, request: Request) -> float:
        """When *request* stops waiting in the queue: as long as a direct read waits
        for a connection (its whole budget while the server is down)."""
        if self._pool._server.down:
            return request.attempts.deadline
        patience: float = self._pool.acquire_timeout
        return min(request.attempts.deadline, request.since + patience)

    def _arm(self, now: float) -> None:
        """One timer for the whole queue, at the soonest due (the oldest read, mostly):
        a timer per read cost a twentieth of the throughput."""
        if self._queue:
            due = min(self._due(request) for request in self._queue)
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(max(due - now, 0.0), self._patrol)

    def _patrol(self) -> None:
        self._watchdog = None
        now = time.monotonic()
        for request in list(self._queue):
            if now >= self._due(request):
                self._late(request, now)
        self._arm(now)

    def _late(self, request: Request, now: float) -> None:
        """*request* waited in the queue as long as a direct read waits for a connection
        (its drivers busy, or waiting for a connection themselves): it hears why, as a
        direct read would (`_slots.acquire`)."""
        self._queue.remove(request)
        settle(request, exc=gave_up(self._pool, now - request.since, 1, count=True))

    def _take(self) -> list[Request]:
        """The next batch, oldest first: everything queued while reads are short (the
        fewest round trips); else this driver's share (the queue over the drivers), so
        long reads run side by side on several connections, not one after another."""
        queued = len(self._queue)
        share = queued if self.short else -(-queued // self.drivers)
        return [self._queue.popleft() for _ in range(min(_MAX_BATCH, share))]

    def _fail_all(self, exc: BaseException) -> None:
        while self._queue:
            settle(self._queue.popleft(), exc=copy_error(exc))
