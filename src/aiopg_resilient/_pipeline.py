"""One pipelined batch of reads: a read-only guard, every statement, one Sync; each
caller its own answer.

The statements up to a Sync share one implicit transaction. So a batch starts with
`READ_ONLY`: a write put through a read call (``fetchval("INSERT ... RETURNING id")``,
``nextval``) fails there with 25006 and runs on a connection of its own instead, as
without multiplexing. And when a statement fails, the transaction is rolled back under
the statements before it too (a ``pg_notify`` among them would be lost): its caller gets
its error, and every other statement is sent again. A deadlock (40P01, which a
neighbour's lock held to the end of the batch may cause) runs the read on a connection of
its own. Each cursor records the error of its own result, so an error reaches the caller
whose statement raised it; rows are made in the caller's row factory only when its answer
is read, so a row factory that fails reaches its caller only.

Pure protocol work on one connection, for `_multiplex`: what the batch cannot settle
itself (the connection failed) is raised for the caller of `Batch` to handle.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncCursor
from psycopg.rows import tuple_row

from ._attempts import Attempts
from ._driver import DriverConnection, tuple_cursor
from ._errors import Failure, classify
from ._statement import Statement
from ._statement import several as may_hold_several

__all__ = ["READ_ONLY", "Again", "Batch", "Request", "copy_error", "settle", "several"]

READ_ONLY = "SELECT set_config('transaction_read_only', 'on', true)"
"""The first statement of every batch (see the module doc)."""
_ON_ITS_OWN = frozenset({"25006", "40P01"})
"""A write refused by the read-only batch; a deadlock the batch's own locks may cause."""


@dataclass(frozen=True)
class Again:
    """Send the statement again: *error* lost its connection (after a backoff), or it
    was not sent (``backoff=False``: at once, not an attempt)."""

    error: BaseException
    backoff: bool = True
    unexplained: bool = False
    """The batch failed neither by a statement nor visibly by the connection: its
    connection was dropped; a second such failure of the same read reaches its caller."""
    direct: bool = False
    """Run it on a connection of its own, as without multiplexing: a write (25006 in the
    read-only batch), or a deadlock its batch may have caused (40P01)."""


@dataclass(eq=False)
class Request:
    """A read waiting for its answer: the statement, its caller's attempts, when it
    began to wait for a connection, and the future its caller awaits."""

    stmt: Statement[Any]
    attempts: Attempts
    since: float
    future: asyncio.Future[Any]


def settle(
    request: Request,
    *,
    value: Any = None,
    exc: BaseException | None = None,
    again: Again | None = None,
) -> None:
    """Give *request*'s caller its outcome, unless it is gone (cancelled, or already
    answered): then the outcome is thrown away."""
    future = request.future
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(again if again is not None else value)


class Batch:
    """The statements of *requests* as one pipeline on one connection (a `watched` op)."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests
        self._sent: list[tuple[Request, AsyncCursor[Any]]] = []

    async def __call__(self, conn: DriverConnection) -> None:
        """Send the guard and every statement, one Sync, then settle every request. A
        failure of the connection is raised, the requests sent left unsettled."""
        sent = self._sent
        guard = tuple_cursor(conn)
        try:
            async with conn.pipeline() as pipeline:
                await guard.execute(READ_ONLY, prepare=False)
                for request in self.requests:
                    cur = _recording(conn, request.stmt.user_rows)
                    try:
                        await cur.execute(request.stmt.query, request.stmt.params, prepare=False)
                    except psycopg.Error as exc:
                        if not _statement_error(exc):
                            if conn.closed or conn.broken or classify(exc) is Failure.CONNECTION:
                                raise
                            settle(request, exc=exc)  # refused by the client: not sent
                            continue
                        # A statement's error (this one's or an earlier one's), found as
                        # the pipeline read what had come back: this one was sent.
                    except Exception as exc:
                        settle(request, exc=exc)  # e.g. a parameter no dumper adapts
                        continue
                    sent.append((request, cur))
                try:
                    await pipeline.sync()
                except psycopg.Error as exc:
                    if not _statement_error(exc):
                        raise
                    # On its cursor; the block ends clean, so the pipeline is left idle.
        except psycopg.Error as exc:
            if not _statement_error(exc):
                raise  # each statement error is on its cursor: only this is the batch's
        for _, cur in sent:
            error = _error_of(cur)
            if error is not None and not _statement_error(error):
                raise error  # 57P01 and the like: the session ended under the batch
        if guard.pgresult is None:
            raise _error_of(guard) or psycopg.OperationalError("the batch's guard failed")
        await self._answer()

    async def _answer(self) -> None:
        errors = [_error_of(cur) for _, cur in self._sent]
        failed = any(e is not None and not _aborted(e) for e in errors)
        for (request, cur), error in zip(self._sent, errors, strict=True):
            if error is not None and not _aborted(error):
                if error.sqlstate in _ON_ITS_OWN:
                    settle(request, again=Again(error, backoff=False, direct=True))
                else:
                    settle(request, exc=error)
                continue
            if failed or cur.pgresult is None:
                # Rolled back with the failed statement, or aborted by it: again.
                settle(request, again=Again(error or Exception("rolled back"), backoff=False))
                continue
            try:
                cur.row_factory = cur.wanted_rows  # type: ignore[attr-defined]
                value = await request.stmt.collect(cur)
            except Exception as exc:
                settle(request, exc=exc)
            else:
                settle(request, value=value)


def _aborted(error: psycopg.Error) -> bool:
    return isinstance(error, psycopg.errors.PipelineAborted)


def _statement_error(exc: psycopg.Error) -> bool:
    """An error of a statement (or one it caused), not of the connection: 57P01 admin
    shutdown and the other errors that end the session are the connection's."""
    if isinstance(exc, psycopg.errors.PipelineAborted):
        return True
    return exc.sqlstate is not None and classify(exc) is not Failure.CONNECTION


_RECORDING: dict[type[Any], type[Any]] = {}


def _recording(conn: DriverConnection, user_rows: bool) -> AsyncCursor[Any]:
    """A cursor of the user's cursor factory that keeps the error of its own result (the
    pipeline raises only the first error of each round it reads, so errors cannot be
    matched to statements by order), its rows wanted in the user's row factory."""
    base = conn.cursor_factory
    kind = _RECORDING.get(base)
    if kind is None:

        def _check_results(self: Any, results: Any) -> None:
            try:
                base._check_results(self, results)
            except psycopg.Error as exc:
                self.own_error = exc
                raise

        kind = _RECORDING[base] = type(f"Recording{base.__name__}", (base,), {})
        kind._check_results = _check_results
    # Rows are made in the caller's row factory only when its answer is read (`_answer`):
    # a row factory that fails on a result (namedtuple_row on duplicate column names)
    # would fail inside the pipeline's reading, in whichever statement came next.
    recording: AsyncCursor[Any] = kind(conn, row_factory=tuple_row)
    recording.wanted_rows = conn.row_factory if user_rows else tuple_row  # type: ignore[attr-defined]
    return recording


def _error_of(cur: AsyncCursor[Any]) -> psycopg.Error | None:
    error: psycopg.Error | None = getattr(cur, "own_error", None)
    return error


def several(stmt: Statement[Any]) -> bool:
    """A text without parameters that may hold several statements: psycopg sends it as a
    simple query alone, which a pipeline cannot (extended protocol only)."""
    return stmt.params is None and may_hold_several(stmt.query, None)


def copy_error(exc: BaseException) -> BaseException:
    """A copy of *exc* for one more caller: tracebacks of different tasks stay apart."""
    try:
        twin = copy.copy(exc)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return exc
    twin.__cause__ = exc.__cause__
    return twin
