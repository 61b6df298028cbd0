"""The read and write operations of a pool: what is replayed, what is resolved.

Reads are replayed freely. A write is replayed only when the layer proved it was not
applied: the connection died before COMMIT was sent (the server rolls back an open
transaction it loses), or the COMMIT's outcome was resolved as aborted through the
transaction id (see `_commit`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import anyio
import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, sql
from psycopg.abc import Params
from psycopg.pq import TransactionStatus

from ._commit import RESOLVE_QUERY, TERMINATE_QUERY, XID_QUERY, Step, decide
from ._errors import CommitUnknown, ConnectionLost, DatabaseUnavailable, Failure, classify
from ._retry import Backoff, RetryPolicy

if TYPE_CHECKING:
    from ._pool import _Slot

__all__ = ["Operations", "Query"]

logger = logging.getLogger("aiopg_resilient.pool")

T = TypeVar("T")
Query = str | bytes | sql.SQL | sql.Composed
InDoubt = Literal["resolve", "raise"]
Op = Callable[[AsyncConnection[Any]], Awaitable[T]]

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_NOT_IN_A_BLOCK = "25001"  # active_sql_transaction: "cannot run inside a transaction block"


class _Attempts:
    """Counts the attempts of one operation and sleeps between them within its budget."""

    __slots__ = ("_backoff", "_policy", "_rng", "count", "deadline")

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._backoff: Backoff | None = None
        self.deadline = time.monotonic() + policy.budget
        self.count = 0

    async def again(self, exc: BaseException, *, immediate_first: bool = True) -> None:
        """Sleep before the next attempt, or raise DatabaseUnavailable if none is left."""
        limit = self._policy.max_attempts
        if time.monotonic() >= self.deadline or (limit is not None and self.count >= limit):
            raise DatabaseUnavailable(
                f"gave up after {self.count} attempts: {exc}",
                attempts=self.count,
                last_error=exc,
            ) from exc
        if self.count == 1 and immediate_first:
            return  # a stale connection is the usual cause: retry at once
        self._backoff = self._backoff or Backoff(self._policy, self._rng)
        await anyio.sleep(min(self._backoff.next(), max(self.deadline - time.monotonic(), 0)))


def _first(row: Any) -> Any:
    if isinstance(row, Sequence):
        return row[0]
    if isinstance(row, dict):
        return next(iter(row.values()))
    return row[0]


async def _all(cur: AsyncCursor[Any]) -> list[Any]:
    return await cur.fetchall()


async def _one(cur: AsyncCursor[Any]) -> Any:
    return await cur.fetchone()


async def _value(cur: AsyncCursor[Any]) -> Any:
    row = await cur.fetchone()
    return None if row is None else _first(row)


async def _rowcount(cur: AsyncCursor[Any]) -> int:
    return cur.rowcount


@dataclass(frozen=True)
class Statement(Generic[T]):
    """One statement and how to read its result off the cursor."""

    query: Query
    params: Params | None
    collect: Callable[[AsyncCursor[Any]], Awaitable[T]]

    async def run(self, conn: AsyncConnection[Any]) -> T:
        return await self.collect(await conn.execute(self.query, self.params))


class Operations:
    """fetch/execute/transaction/run_transaction on top of a pool's acquire and release."""

    retry: RetryPolicy
    in_doubt: InDoubt
    heartbeat_timeout: float
    _counters: dict[str, int]
    _rng: random.Random
    _block_autocommit: bool

    # Provided by the pool.
    async def _acquire(self, deadline: float) -> _Slot:
        raise NotImplementedError

    async def _release(self, slot: _Slot) -> None:
        raise NotImplementedError

    async def _discard(self, slot: _Slot) -> None:
        raise NotImplementedError

    async def _lost(self, slot: _Slot, exc: BaseException | None) -> None:
        raise NotImplementedError

    # -- reads -----------------------------------------------------------------------

    async def fetch(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> list[Any]:
        """All rows of *query*; replayed transparently after a connection failure.

        ``idempotent=False`` (a SELECT calling a function that writes) gives the statement
        `execute`'s write-safe treatment instead.
        """
        return await self._run(Statement(query, params, _all), idempotent)

    async def fetchone(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        """The first row of *query*, or ``None``; replayed after a connection failure."""
        return await self._run(Statement(query, params, _one), idempotent)

    async def fetchval(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        """The first column of the first row of *query*, or ``None``; replayed."""
        return await self._run(Statement(query, params, _value), idempotent)

    async def execute(
        self, query: Query, params: Params | None = None, *, idempotent: bool = False
    ) -> int:
        """Run a statement and return its rowcount; never doubled, never silently lost.

        The statement runs in a transaction whose id is learnt in the same round trip
        (two round trips in all; parameters are bound client-side, as psycopg's
        `ClientCursor` does, to send BEGIN, the statement and the id query at once).
        A connection lost before COMMIT was sent means nothing was applied: it is
        re-run. A COMMIT whose answer was lost is resolved through the transaction id:
        committed -> the rowcount; aborted -> re-run; unknowable -> `CommitUnknown`.
        Statements that cannot run in a transaction block (``VACUUM``, ``CREATE INDEX
        CONCURRENTLY``) run once in autocommit, and a connection lost then raises
        `ConnectionLost`. With ``idempotent=True`` the caller vouches that running it
        twice is harmless: it is replayed like a read, in one round trip.
        """
        return await self._run(Statement(query, params, _rowcount), idempotent)

    async def _run(self, stmt: Statement[T], idempotent: bool) -> T:
        return await (self._replay(stmt.run) if idempotent else self._write(stmt))

    async def _replay(self, op: Op[T]) -> T:
        """Run *op*, replaying it on a fresh connection after a transient failure until
        the retry budget is spent. Only for operations that are safe to replay."""
        attempts = _Attempts(self.retry, self._rng)
        while True:
            attempts.count += 1
            slot = await self._acquire(attempts.deadline)
            try:
                result = await op(slot.conn)
            except Exception as exc:
                if not (slot.conn.broken or classify(exc).retryable):
                    await self._release(slot)
                    raise
                await self._lost(slot, exc)
                self._counters["retries"] += 1
                await attempts.again(exc)
                continue
            except BaseException:
                await self._discard(slot)  # cancelled mid-query: its state is unknown
                raise
            await self._release(slot)
            return result

    # -- writes ----------------------------------------------------------------------

    async def _write(self, stmt: Statement[T]) -> T:
        """Run *stmt* so that it is applied exactly once (see `execute`)."""

        async def body(conn: AsyncConnection[Any]) -> tuple[T, str | None, str | None]:
            # One round trip: BEGIN, the statement and the transaction's id, sent as one
            # simple query (client-side binding). Cheaper than psycopg's pipeline mode,
            # which pays a TLS write per statement.
            cur = AsyncClientCursor(conn)
            text = cur.mogrify(stmt.query, stmt.params)
            await cur.execute(f"BEGIN;\n{text}\n;\n{XID_QUERY}")
            cur.nextset()
            result = await stmt.collect(cur)
            while cur.nextset():
                pass
            row = await cur.fetchone()
            return (result, row[0], row[1]) if row is not None else (result, None, None)

        try:
            return await self._transact(body, rerun_conflicts=False)
        except psycopg.Error as exc:
            if exc.sqlstate != _NOT_IN_A_BLOCK:
                raise
        return await self._once(stmt.run)

    async def _transact(
        self,
        body: Callable[[AsyncConnection[Any]], Awaitable[tuple[T, str | None, str | None]]],
        *,
        rerun_conflicts: bool,
    ) -> T:
        """Run *body* (which opens a transaction and returns its result, xid and
        timeline) and commit it; re-run it when it was proven not applied, and, with
        *rerun_conflicts*, after a serialization failure or a deadlock."""
        attempts = _Attempts(self.retry, self._rng)
        while True:
            attempts.count += 1
            slot = await self._acquire(attempts.deadline)
            conn = slot.conn
            try:
                result, xid, timeline = await body(conn)
            except Exception as exc:
                failure = classify(exc)
                if conn.broken and isinstance(exc, psycopg.Error):
                    failure = Failure.CONNECTION
                if failure.retryable:
                    # COMMIT was never sent: the server rolls the transaction back.
                    await self._lost(slot, exc)
                elif failure is Failure.TRANSACTION and rerun_conflicts:
                    await self._rollback_and_release(slot)
                else:
                    await self._rollback_and_release(slot)
                    raise
                self._counters["retries"] += 1
                await attempts.again(exc, immediate_first=failure.retryable)
                continue
            except BaseException:
                await self._discard(slot)
                raise
            try:
                committed = await self._commit(slot, xid, timeline, attempts.deadline)
            except psycopg.Error as exc:
                if not (rerun_conflicts and classify(exc) is Failure.TRANSACTION):
                    raise
                committed = False  # serialization failure at COMMIT: rolled back
            if committed:
                return result
            self._counters["retries"] += 1
            await attempts.again(ConnectionLost("transaction aborted"), immediate_first=False)

    async def _once(self, op: Op[T]) -> T:
        """Run *op* once in autocommit; a connection loss raises ConnectionLost."""
        attempts = _Attempts(self.retry, self._rng)
        slot = await self._acquire(attempts.deadline)
        try:
            result = await op(slot.conn)
        except Exception as exc:
            if slot.conn.broken or classify(exc) is Failure.CONNECTION:
                await self._lost(slot, exc)
                raise ConnectionLost(
                    f"connection lost while the statement may have run; not retried: {exc}"
                ) from exc
            await self._release(slot)
            raise
        except BaseException:
            await self._discard(slot)
            raise
        await self._release(slot)
        return result

    async def _rollback_and_release(self, slot: _Slot) -> None:
        try:
            if slot.conn.pgconn.transaction_status != _IDLE:
                await slot.conn.rollback()
        except Exception:
            await self._discard(slot)
            return
        except BaseException:
            await self._discard(slot)
            raise
        await self._release(slot)

    async def _commit(
        self, slot: _Slot, xid: str | None, timeline: str | None, deadline: float
    ) -> bool:
        """Send COMMIT and release the connection; True if committed (or nothing was
        written), False if the transaction was proven aborted. Raises CommitUnknown."""
        conn = slot.conn
        pid = conn.info.backend_pid
        try:
            # A COMMIT unanswered for heartbeat_timeout means a half-open peer: stop
            # waiting and ask the server what happened instead.
            with anyio.fail_after(self.heartbeat_timeout):
                await conn.execute("COMMIT")
        except Exception as exc:
            if not (conn.broken or isinstance(exc, TimeoutError)) and not classify(exc).retryable:
                await self._rollback_and_release(slot)  # the server answered: aborted
                raise
            await self._lost(slot, exc)
            if xid is None:
                return True  # the transaction wrote nothing: nothing to lose
            if self.in_doubt == "raise":
                self._counters["commits_unknown"] += 1
                raise CommitUnknown(
                    f"connection lost during COMMIT of transaction {xid}: {exc}", xid=int(xid)
                ) from exc
            return await self._resolve(int(xid), timeline, pid, deadline, exc)
        except BaseException:
            await self._discard(slot)
            raise
        await self._release(slot)
        return True

    async def _resolve(
        self, xid: int, timeline: str | None, pid: int, deadline: float, cause: BaseException
    ) -> bool:
        """Learn what became of transaction *xid*; True if it committed."""
        logger.warning("commit of transaction %s in doubt (%s): resolving", xid, cause)
        backoff = Backoff(self.retry, self._rng)
        # Resolution gets a budget of its own even when the operation's is nearly spent.
        deadline = max(deadline, time.monotonic() + 4 * self.heartbeat_timeout)
        started = time.monotonic()
        params = {"xid": str(xid), "pid": pid}
        while True:
            try:
                row = await self._replay(Statement(RESOLVE_QUERY, params, _one).run)
            except psycopg.Error as exc:
                self._counters["commits_unknown"] += 1
                raise CommitUnknown(
                    f"could not resolve the commit of transaction {xid}: {exc}", xid=xid
                ) from cause
            status, timeline_now, holder = row
            verdict = decide(
                status,
                timeline,
                timeline_now,
                holder,
                waited=time.monotonic() - started,
                patience=self.heartbeat_timeout,
            )
            if verdict.step is Step.COMMITTED or verdict.step is Step.ABORTED:
                self._counters["commits_resolved"] += 1
                logger.warning("transaction %s resolved: %s", xid, verdict.step.value)
                return verdict.step is Step.COMMITTED
            if verdict.step is Step.UNKNOWN or time.monotonic() >= deadline:
                self._counters["commits_unknown"] += 1
                raise CommitUnknown(
                    f"outcome of transaction {xid} unknown: {verdict.reason or 'timed out'}",
                    xid=xid,
                ) from cause
            if verdict.step is Step.TERMINATE:
                logger.warning("terminating backend %s holding transaction %s", pid, xid)
                await self._replay(Statement(TERMINATE_QUERY, params, _one).run)
            await anyio.sleep(backoff.next())

    # -- blocks ----------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A live connection for a block: commit on clean exit, rollback on error.

        Connecting is retried within the retry budget; what runs inside the block is not
        replayed: a connection lost there raises `ConnectionLost`. A COMMIT whose answer
        was lost is resolved like `transaction`'s. The connection goes back to the pool
        afterwards, or is discarded if it broke or its state is unknown (for example when
        the block was cancelled).
        """
        async with self._block(autocommit=None) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection[Any]]:
        """One transaction on one connection, committed on clean exit.

        A connection lost inside the block raises `ConnectionLost` (nothing was applied).
        A COMMIT whose answer was lost is resolved through the transaction id: committed
        -> the block succeeds; aborted -> `ConnectionLost`; unknowable -> `CommitUnknown`.
        """
        async with self._block(autocommit=False) as conn:
            yield conn

    @asynccontextmanager
    async def _block(self, *, autocommit: bool | None) -> AsyncIterator[AsyncConnection[Any]]:
        attempts = _Attempts(self.retry, self._rng)
        slot = await self._acquire(attempts.deadline)
        conn = slot.conn
        try:
            if not (self._block_autocommit if autocommit is None else autocommit):
                await conn.set_autocommit(False)
            yield conn
            xid, timeline = await self._learn_xid(conn)
        except Exception as exc:
            if conn.broken or classify(exc) is Failure.CONNECTION:
                await self._lost(slot, exc)
                raise ConnectionLost(
                    f"connection lost inside the block; nothing was committed: {exc}"
                ) from exc
            await self._rollback_and_release(slot)
            raise
        except BaseException:
            await self._discard(slot)
            raise
        if not await self._commit(slot, xid, timeline, attempts.deadline):
            raise ConnectionLost(
                "connection lost during COMMIT; the transaction was rolled back: "
                "nothing was applied"
            )

    async def _learn_xid(self, conn: AsyncConnection[Any]) -> tuple[str | None, str | None]:
        """Before COMMIT: the transaction's id and timeline (one round trip), if it wrote."""
        status = conn.pgconn.transaction_status
        if status == _IDLE:
            return None, None
        if status != _INTRANS:
            # The block swallowed an error: COMMIT would silently roll back.
            raise psycopg.errors.InFailedSqlTransaction(
                "the transaction failed inside the block (an error was caught there); "
                "it was rolled back"
            )
        cur = await conn.execute(XID_QUERY)
        row = await cur.fetchone()
        return (row[0], row[1]) if row is not None else (None, None)

    async def run_transaction(
        self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """Run ``await fn(conn, *args, **kwargs)`` in a transaction and commit it; re-run
        it when that is safe, and return its result once committed.

        *fn* is re-run (with backoff, within ``retry.timeout``) after a connection loss
        before COMMIT, after a COMMIT resolved as aborted, and on serialization failure
        (40001) or deadlock (40P01). It is never re-run after a commit, so it must keep
        its side effects inside the transaction.
        """

        async def body(conn: AsyncConnection[Any]) -> tuple[T, str | None, str | None]:
            await conn.set_autocommit(False)
            result = await fn(conn, *args, **kwargs)
            xid, timeline = await self._learn_xid(conn)
            return result, xid, timeline

        return await self._transact(body, rerun_conflicts=True)
