"""The read and write operations of a pool: what is replayed, what is resolved.

Reads are replayed freely. A write is replayed only when the layer proved it was not
applied: the connection died before COMMIT was sent (the server rolls back an open
transaction it loses), or the COMMIT's outcome was resolved as aborted (see `_commit`,
`_indoubt`). Only a failure of the connection itself counts as one (guarantee 10): an
exception of the caller's code or an error of the statement reaches the caller as it is,
after a rollback, and the connection stays in the pool.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncRawCursor
from psycopg.abc import Params
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from ._attempts import Attempts
from ._commit import WRITE_XID_QUERY, XID_QUERY, Pending
from ._driver import DriverConnection, tuple_cursor
from ._errors import CommitUnknown, ConnectionLost
from ._events import EventStream
from ._failures import failure_of, is_conflict
from ._indoubt import Resolver
from ._look import Looker
from ._retry import RetryPolicy
from ._source import ConnectionSource, Slot
from ._statement import Query, Statement, all_rows, one_row, rowcount, several, value
from ._watch import SilentPeer, watched

__all__ = ["Operations", "Query"]

logger = logging.getLogger("aiopg_resilient.pool")

T = TypeVar("T")
R = TypeVar("R")
InDoubt = Literal["resolve", "raise"]
Op = Callable[[DriverConnection], Awaitable[T]]

_IDLE = TransactionStatus.IDLE
_INTRANS = TransactionStatus.INTRANS
_NOT_IN_A_BLOCK = "25001"  # active_sql_transaction: "cannot run inside a transaction block"


class SharedReads(Protocol):
    """Where reads go when they may share a connection (`_multiplex.Multiplexer`)."""

    async def read(self, stmt: Statement[T]) -> T: ...


class Operations:
    """fetch/execute and the write protocol, over a `ConnectionSource`."""

    def __init__(
        self,
        source: ConnectionSource,
        *,
        retry: RetryPolicy,
        in_doubt: InDoubt,
        heartbeat_timeout: float,
        rng: random.Random,
        events: EventStream,
    ) -> None:
        self._source = source
        self.retry = retry
        self.in_doubt: InDoubt = in_doubt
        self.heartbeat_timeout = heartbeat_timeout
        self._rng = rng
        self._events = events
        self.multiplexer: SharedReads | None = None
        """Set by the pool with ``multiplex=True``: reads in flight together share
        connections (`_multiplex`)."""
        self.looker: Looker | None = None
        """Set by the pool: looks at the backends of slow statements (`_watch`)."""
        self._resolver = Resolver(
            source._side_query,
            patience=heartbeat_timeout,
            retry=retry,
            rng=rng,
            raise_only=in_doubt == "raise",
            emit=events.emit,
        )

    # -- reads -----------------------------------------------------------------------

    async def fetch(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> list[Any]:
        """All rows of *query*; replayed transparently after a connection failure.

        ``idempotent=False`` (a SELECT calling a function that writes) gives the statement
        `execute`'s write-safe treatment instead.
        """
        return await self._run(Statement(query, params, all_rows), idempotent)

    async def fetchone(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        """The first row of *query*, or ``None``; replayed after a connection failure."""
        return await self._run(Statement(query, params, one_row), idempotent)

    async def fetchval(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        """The first column of the first row of *query* (the value itself, whatever the
        ``row_factory``), or ``None``; replayed after a connection failure."""
        return await self._run(Statement(query, params, value, user_rows=False), idempotent)

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
        return await self._run(Statement(query, params, rowcount, user_rows=False), idempotent)

    async def _watched(
        self,
        conn: DriverConnection,
        op: Callable[[DriverConnection], Awaitable[R]],
        size: Callable[[], int],
    ) -> R:
        """*op* on *conn*, abandoned (`SilentPeer`) if the path goes silent (`_watch`)."""
        return await watched(conn, op, self.looker, self.heartbeat_timeout, size)

    async def _run(self, stmt: Statement[T], idempotent: bool) -> T:
        if not idempotent:
            return await self._write(stmt)
        if self.multiplexer is not None and stmt.collect is not rowcount:
            return await self.multiplexer.read(stmt)  # a read: it may share a connection
        return await self._replay(stmt.run, stmt.size)

    async def _replay(self, op: Op[T], size: Callable[[], int] = lambda: 0) -> T:
        """Run *op*, replaying it on a fresh connection after a failure of the connection
        until the retry budget is spent. Only for operations that are safe to replay."""
        attempts = Attempts(self.retry, self._rng)
        while True:
            attempts.count += 1
            slot = await self._source._acquire(attempts.deadline)
            try:
                result = await self._watched(slot.conn, op, size)
            except Exception as exc:
                if await failure_of(slot.conn, exc) is None:
                    await self._source._release(slot)
                    raise
                await self._source._lost(slot, exc)
                self._events.emit("retry", error=exc)
                await attempts.again(exc)
                continue
            except BaseException:
                await self._source._discard(slot)  # cancelled mid-query: its state is unknown
                raise
            await self._source._release(slot)
            return result

    # -- writes ----------------------------------------------------------------------

    async def _write(self, stmt: Statement[T]) -> T:
        """Run *stmt* so that it is applied exactly once (see `execute`)."""

        async def body(slot: Slot) -> tuple[T, Pending | None]:
            conn = slot.conn
            if issubclass(conn.cursor_factory, AsyncRawCursor):
                # $1-style placeholders cannot be bound client-side: three round trips.
                await tuple_cursor(conn).execute("BEGIN", prepare=False)
                result = await stmt.run(conn)
                return result, await self._learn(conn)
            # One round trip: BEGIN, the statement and the transaction's id, sent as one
            # simple query (client-side binding). Cheaper than psycopg's pipeline mode,
            # which pays a TLS write per statement.
            cur: AsyncClientCursor[Any] = AsyncClientCursor(
                conn, row_factory=conn.row_factory if stmt.user_rows else tuple_row
            )
            text = cur.mogrify(stmt.query, stmt.params)
            batch = f"BEGIN;\n{text}\n;\n{WRITE_XID_QUERY}"
            try:
                await self._watched(
                    conn, lambda c: cur.execute(batch, prepare=False), lambda: len(batch)
                )
            except Exception as exc:
                if several(stmt.query, conn) and (
                    isinstance(exc, SilentPeer) or (conn.closed and not conn.interrupted)
                ):
                    # Several statements: one of them may have been a COMMIT that ran.
                    raise _MayHaveRun() from exc
                raise
            cur.nextset()
            result = await stmt.collect(cur)
            cur.row_factory = tuple_row  # before the id's result set comes up
            while cur.nextset():
                pass
            return result, Pending.learnt(await cur.fetchone(), conn.identity)

        try:
            return await self._transact(body, rerun_conflicts=False)
        except psycopg.Error as exc:
            if exc.sqlstate != _NOT_IN_A_BLOCK:
                raise
        return await self._once(stmt.run)

    async def _transact(
        self,
        body: Callable[[Slot], Awaitable[tuple[T, Pending | None]]],
        *,
        rerun_conflicts: bool,
    ) -> T:
        """Run *body* (which opens a transaction and returns its result and what is
        known of it) and commit it; re-run it when it was proven not applied, and, with
        *rerun_conflicts*, after a serialization failure or a deadlock."""
        attempts = Attempts(self.retry, self._rng)
        while True:
            attempts.count += 1
            slot = await self._source._acquire(attempts.deadline)
            try:
                result, pending = await body(slot)
            except _MayHaveRun as exc:
                await self._source._lost(slot, exc.__cause__)
                self._events.emit("commit_unknown", outcome="unknown")
                raise CommitUnknown(
                    "connection lost while a text of several statements ran; if one of them "
                    f"was a COMMIT it may have been applied: {exc.__cause__}"
                ) from exc.__cause__
            except Exception as exc:
                failure = await failure_of(slot.conn, exc)
                if failure is not None:
                    # COMMIT was never sent: the server rolls the transaction back.
                    await self._source._lost(slot, exc)
                else:
                    await self._rollback_and_release(slot)
                    if not (rerun_conflicts and is_conflict(exc)):
                        raise
                self._events.emit("retry", error=exc)
                await attempts.again(exc, immediate_first=failure is not None)
                continue
            except BaseException:
                await self._source._discard(slot)
                raise
            try:
                committed = await self._commit(slot, pending, attempts.deadline)
            except CommitUnknown:
                raise
            except psycopg.Error as exc:
                if not (rerun_conflicts and is_conflict(exc)):
                    raise
                committed = False  # serialization failure at COMMIT: rolled back
            if committed:
                return result
            self._events.emit("retry", outcome="aborted")
            await attempts.again(ConnectionLost("transaction aborted"), immediate_first=False)

    async def _once(self, op: Op[T]) -> T:
        """Run *op* once in autocommit; a connection loss raises ConnectionLost."""
        attempts = Attempts(self.retry, self._rng)
        slot = await self._source._acquire(attempts.deadline)
        try:
            result = await op(slot.conn)
        except Exception as exc:
            if await failure_of(slot.conn, exc) is not None:
                await self._source._lost(slot, exc)
                raise ConnectionLost(
                    f"connection lost while the statement may have run; not retried: {exc}"
                ) from exc
            await self._source._release(slot)
            raise
        except BaseException:
            await self._source._discard(slot)
            raise
        await self._source._release(slot)
        return result

    async def _rollback_and_release(self, slot: Slot) -> None:
        conn = slot.conn
        conn.owner = None
        try:
            if conn.pgconn.transaction_status != _IDLE:
                await conn.plain_rollback()
        except Exception:
            await self._source._discard(slot)
            return
        except BaseException:
            await self._source._discard(slot)
            raise
        await self._source._release(slot)

    async def _learn(self, conn: DriverConnection) -> Pending | None:
        """Before COMMIT: the transaction's id, backend and server incarnation (one round
        trip), if it wrote anything."""
        status = conn.pgconn.transaction_status
        if status == _IDLE:
            return None
        if status != _INTRANS:
            # The block swallowed an error: COMMIT would silently roll back.
            raise psycopg.errors.InFailedSqlTransaction(
                "the transaction failed inside the block (an error was caught there); "
                "it was rolled back"
            )
        cur = tuple_cursor(conn)
        await cur.execute(XID_QUERY, prepare=False)
        return Pending.learnt(await cur.fetchone(), conn.identity)

    async def _commit(
        self,
        slot: Slot,
        pending: Pending | None,
        deadline: float,
        *,
        keep: bool = False,
        on_lost: Callable[[], None] | None = None,
    ) -> bool:
        """COMMIT on *slot*; True if committed (or nothing was written), False if proven
        aborted. Releases the connection unless *keep*; a connection that died or went
        silent is dropped first (then *on_lost*), so resolving never waits for itself.
        Raises CommitUnknown, or the error the server answered COMMIT with."""
        lost = False

        async def drop(exc: BaseException) -> None:
            nonlocal lost
            lost = True
            if on_lost is not None:
                on_lost()
            await self._source._lost(slot, exc)

        conn = slot.conn
        if pending is None and conn.pgconn.transaction_status == _IDLE:
            if not keep:  # nothing to commit (the block ran nothing, or ended it itself)
                await self._source._release(slot)
            return True
        try:
            committed = await self._resolver.commit(conn, pending, deadline, drop)
        except BaseException as exc:
            if not lost and not keep:
                if isinstance(exc, psycopg.Error) and not isinstance(exc, CommitUnknown):
                    await self._rollback_and_release(slot)  # the server answered: rolled back
                else:
                    await self._source._discard(slot)
            raise
        if not lost and not keep:
            await self._source._release(slot)
        return committed


class _MayHaveRun(Exception):
    """The connection died while statements that may end the transaction ran (internal)."""
