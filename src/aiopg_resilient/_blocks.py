"""The blocks of the layer: ``connection()`` and ``transaction()``, and who owns their
transaction (guarantee 9).

While a block holds a connection, the connection's ``owner`` is a `BlockOwner`: a user's
``conn.transaction()`` becomes a savepoint of the block's transaction (see
`DriverConnection.transaction`); ``conn.commit()`` and ``conn.rollback()`` are refused in
``transaction()`` and ``run_transaction()``; in ``connection()`` (where psycopg_pool users
commit in batches) ``conn.commit()`` goes through the in-doubt protocol like the block's
own COMMIT: a lost answer is resolved or `CommitUnknown`, never "nothing was committed".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from ._attempts import Attempts
from ._commit import Pending
from ._driver import DriverConnection
from ._errors import CommitUnknown, ConnectionLost
from ._failures import failure_of
from ._ops import Operations
from ._source import Slot

T = TypeVar("T")

__all__ = ["BlockOwner", "Blocks", "block", "held_here"]

# The pools whose connections are held in blocks, each with a cell that says whether the
# block is still running. Tasks started inside a block inherit the context: while the
# block runs, they cannot get its connection either (asyncio.wait_for on Python < 3.12
# and gather run their coroutine in a task of its own).
_HELD: ContextVar[tuple[tuple[int, list[bool]], ...]] = ContextVar(
    "aiopg_resilient_held", default=()
)


def held_here(ops: object) -> int:
    """How many connections of *ops* are held by blocks this task runs in (its own, and
    those of the tasks that started it, while they last)."""
    key = id(ops)
    return sum(1 for held, running in _HELD.get() if held == key and running[0])


@contextmanager
def _holding(ops: object) -> Iterator[None]:
    running = [True]
    token = _HELD.set((*_HELD.get(), (id(ops), running)))
    try:
        yield
    finally:
        running[0] = False
        _HELD.reset(token)


_REFUSED = (
    "conn.{0}() is not allowed inside transaction() or run_transaction(): the pool "
    "commits when the block ends, or rolls back when it raises. Nothing was committed; "
    "the block's transaction will be rolled back. (Use connection() to commit yourself.)"
)


class BlockOwner:
    """Receives ``conn.commit()`` and ``conn.rollback()`` while a block holds *slot*."""

    def __init__(
        self,
        ops: Operations,
        slot: Slot,
        *,
        user_commits: bool,
        deadline: float = 0.0,
        autocommit: bool = False,
    ) -> None:
        self._ops = ops
        self._slot = slot
        self._user_commits = user_commits
        self._deadline = deadline
        self._autocommit = autocommit
        self._plain = False
        self.gone = False
        """The connection was dropped by a commit() whose answer was lost."""
        self.committed_before = False

    def ended_by_sql(self) -> None:
        if self._plain:
            return  # our own call of psycopg's commit() or rollback()
        if not self._user_commits:
            raise psycopg.ProgrammingError(
                "a COMMIT or ROLLBACK statement ended the transaction inside transaction() "
                "or run_transaction(): what ran before it was committed or rolled back "
                "outside the write protocol. Not re-run. (Let the block commit, or use "
                "connection().)"
            )
        self.committed_before = True  # connection(): from now on, say "since"

    def _drop(self) -> None:
        self.gone = True

    async def commit(self, conn: DriverConnection) -> None:
        if not self._user_commits:
            raise psycopg.ProgrammingError(_REFUSED.format("commit"))
        if conn._pipeline is not None:
            raise psycopg.ProgrammingError(
                "conn.commit() inside conn.pipeline() in a pool block: leave the pipeline "
                "block first, so the COMMIT's outcome can be resolved if its answer is lost"
            )
        if conn.pgconn.transaction_status != TransactionStatus.INTRANS or conn._num_transactions:
            # Nothing to commit, a failed transaction (COMMIT rolls it back), or inside
            # a conn.transaction() block (psycopg refuses): psycopg's own behaviour.
            await self._plain_call(conn.plain_commit)
            return
        pending = await self._ops._learn(conn)
        committed = await self._ops._commit(
            self._slot, pending, self._deadline, keep=True, on_lost=self._drop
        )
        if not committed:
            raise ConnectionLost(
                "connection lost during commit(); the transaction was rolled back: "
                + self.nothing("applied")
            )
        self.committed_before = True

    async def rollback(self, conn: DriverConnection) -> None:
        if not self._user_commits:
            raise psycopg.ProgrammingError(_REFUSED.format("rollback"))
        await self._plain_call(conn.plain_rollback)

    async def _plain_call(self, call: Callable[[], Awaitable[None]]) -> None:
        self._plain = True
        try:
            await call()
        finally:
            self._plain = False

    def nothing(self, done: str) -> str:
        """Says "nothing was <done>", or since when if the block committed before."""
        if self.committed_before:
            return f"nothing since the block's previous commit() was {done}"
        return f"nothing was {done}"

    def lost_message(self, exc: BaseException) -> str:
        if self._autocommit:
            return (
                "connection lost inside an autocommit block: each statement that completed "
                f"before it was applied, the one in flight may have been: {exc}"
            )
        return f"connection lost inside the block; {self.nothing('committed')}: {exc}"


@asynccontextmanager
async def block(
    ops: Operations, *, user_commits: bool, autocommit: bool
) -> AsyncIterator[DriverConnection]:
    """A connection for a block, committed on clean exit, rolled back on error."""
    attempts = Attempts(ops.retry, ops._rng)
    slot = await ops._source._acquire(attempts.deadline)
    conn = slot.conn
    owner = BlockOwner(
        ops, slot, user_commits=user_commits, deadline=attempts.deadline, autocommit=autocommit
    )
    conn.owner = owner
    try:
        if not autocommit:
            await conn.set_autocommit(False)
        with _holding(ops._source):
            yield conn
        pending = None if owner.gone else await ops._learn(conn)
    except Exception as exc:
        conn.owner = None
        if isinstance(exc, CommitUnknown) or (owner.gone and isinstance(exc, ConnectionLost)):
            if not owner.gone:
                await ops._source._discard(slot)
            raise  # from the user's commit(): already the whole truth
        if owner.gone or await failure_of(conn, exc) is not None:
            if not owner.gone:
                await ops._source._lost(slot, exc)
            if autocommit:  # what completed was applied; what was in flight may have been
                raise CommitUnknown(owner.lost_message(exc)) from exc
            raise ConnectionLost(owner.lost_message(exc)) from exc
        await ops._rollback_and_release(slot)
        raise
    except BaseException:
        conn.owner = None
        if not owner.gone:
            await ops._source._discard(slot)
        raise
    conn.owner = None
    if owner.gone:
        return  # a commit() was resolved as committed, and nothing ran after it
    if not await ops._commit(slot, pending, attempts.deadline):
        raise ConnectionLost(
            "connection lost during COMMIT; the transaction was rolled back: "
            + owner.nothing("applied")
        )


class Blocks(Operations):
    """The operations that hand the caller a connection: blocks and run_transaction."""

    _block_autocommit = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[DriverConnection]:
        """A live connection for a block: commit on clean exit, rollback on error.

        Connecting is retried within the retry budget; what runs inside the block is not
        replayed: a connection lost there raises `ConnectionLost`. The block's
        transaction is the layer's: a ``conn.transaction()`` inside is a savepoint, and
        ``conn.commit()`` commits through the in-doubt protocol (a lost answer is
        resolved, or `CommitUnknown`). The connection goes back to the pool afterwards,
        with what the block changed on it (row factory, isolation level...) undone, or
        is discarded if it broke or its state is unknown (the block was cancelled).
        """
        async with block(self, user_commits=True, autocommit=self._block_autocommit) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[DriverConnection]:
        """One transaction on one connection, committed on clean exit.

        A connection lost inside the block raises `ConnectionLost` (nothing was applied).
        A COMMIT whose answer was lost is resolved through the transaction id: committed
        -> the block succeeds; aborted -> `ConnectionLost`; unknowable -> `CommitUnknown`.
        A ``conn.transaction()`` inside is a savepoint; ``conn.commit()`` and
        ``conn.rollback()`` raise `psycopg.ProgrammingError`. An exception of the block's
        own code is raised as it is, after a rollback.
        """
        async with block(self, user_commits=False, autocommit=False) as conn:
            yield conn

    async def run_transaction(
        self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """Run ``await fn(conn, *args, **kwargs)`` in a transaction and commit it; re-run
        it when that is safe, and return its result once committed.

        *fn* is re-run (with backoff, within ``retry.timeout``) after a connection loss
        before COMMIT, after a COMMIT resolved as aborted, and on serialization failure
        (40001) or deadlock (40P01). It is never re-run after a commit, nor after an
        exception of its own (which is raised as it is, after a rollback). The layer owns
        the transaction: a ``conn.transaction()`` inside *fn* is a savepoint, and
        ``conn.commit()`` / ``conn.rollback()`` raise `psycopg.ProgrammingError`.
        """

        async def body(slot: Slot) -> tuple[T, Pending | None]:
            conn = slot.conn
            conn.owner = BlockOwner(self, slot, user_commits=False)
            try:
                await conn.set_autocommit(False)
                with _holding(self._source):
                    result = await fn(conn, *args, **kwargs)
                return result, await self._learn(conn)
            finally:
                conn.owner = None

        return await self._transact(body, rerun_conflicts=True)
