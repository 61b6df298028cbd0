"""One pipelined batch of reads: every statement, one Sync, each caller its own answer.

Pure protocol work on one connection, for `_multiplex`: what the batch cannot settle
itself (the connection failed) is raised for the caller of `run_batch` to handle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncCursor

from ._attempts import Attempts
from ._driver import DriverConnection, tuple_cursor
from ._errors import Failure, classify
from ._statement import Statement

__all__ = ["READ_ONLY", "Again", "Request", "run_batch", "settle"]

READ_ONLY = "SELECT set_config('transaction_read_only', 'on', true)"
"""The first statement of every batch. The statements up to a Sync share one implicit
transaction, so a statement's error rolls back those before it: were one of them a write
(``fetchval("INSERT ... RETURNING id")``), it would be lost after its caller had its
answer. Read-only, a batch has nothing to lose: a write in it fails (25006) and runs on
a connection of its own instead."""
_READ_ONLY_SQLSTATE = "25006"


@dataclass(frozen=True)
class Again:
    """Send the statement again: *error* lost its connection (after a backoff), or
    another statement's error aborted it (``backoff=False``: at once, not an attempt)."""

    error: BaseException
    backoff: bool = True
    unexplained: bool = False
    direct: bool = False
    """The statement tried to write (25006 in the batch's read-only transaction): it is
    not a read, and runs on a connection of its own, as without multiplexing."""
    """The batch failed neither by a statement nor visibly by the connection: its
    connection was dropped; a second such failure of the same read reaches its caller."""


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

    async def __call__(self, conn: DriverConnection) -> None:
        await run_batch(conn, self.requests)


async def run_batch(conn: DriverConnection, requests: list[Request]) -> None:
    """Send *requests* in one pipeline and settle each: its answer, its own error (of the
    statement, or of the client before sending, e.g. a wrong number of parameters), or
    `Again` when another statement's error aborted it. A failure of the connection
    (nothing attributable to one statement) is raised, the requests it hit unsettled."""
    sent: list[tuple[Request, AsyncCursor[Any]]] = []
    error: psycopg.Error | None = None
    unsent = len(requests)  # where the requests never sent begin
    guard = tuple_cursor(conn)
    try:
        async with conn.pipeline() as pipeline:
            await guard.execute(READ_ONLY, prepare=False)
            for index, request in enumerate(requests):
                cur = request.stmt.cursor(conn)
                try:
                    # No server-side prepare: a PREPARE aborted with the batch would leave
                    # psycopg naming a statement the server never kept.
                    await cur.execute(request.stmt.query, request.stmt.params, prepare=False)
                except psycopg.Error as exc:
                    if _statement_error(exc):
                        error = exc  # an earlier statement's, found while sending
                        unsent = index
                        break
                    if conn.closed or conn.broken or isinstance(exc, psycopg.OperationalError):
                        raise
                    settle(request, exc=exc)  # refused by the client: nothing was sent
                    continue
                except Exception as exc:
                    settle(request, exc=exc)  # e.g. a parameter no dumper adapts
                    continue
                sent.append((request, cur))
            if error is None:
                await pipeline.sync()
    except psycopg.Error as exc:
        # The first statement error (at the Sync, at the pipeline's end, or found while
        # sending), or PipelineAborted for a statement it aborted.
        if not _statement_error(exc):
            raise
        if error is None or isinstance(error, psycopg.errors.PipelineAborted):
            error = exc
    if error is not None and guard.pgresult is None:
        raise error  # the batch's own first statement failed: not any caller's error
    for request in requests[unsent:]:
        settle(request, again=Again(error or Exception("not sent"), backoff=False))
    await _answer(sent, error)


async def _answer(
    sent: list[tuple[Request, AsyncCursor[Any]]], error: psycopg.Error | None
) -> None:
    failed = error is not None
    for request, cur in sent:
        if failed and cur.pgresult is None:
            # The first statement without a result is the one that failed; those after
            # it were aborted by it (PostgreSQL skips to the Sync).
            if error is not None and error.sqlstate == _READ_ONLY_SQLSTATE:
                settle(request, again=Again(error, backoff=False, direct=True))
                error = None
            elif error is not None:
                settle(request, exc=error)
                error = None
            else:
                settle(request, again=Again(Exception("aborted"), backoff=False))
            continue
        try:
            value = await request.stmt.collect(cur)
        except Exception as exc:
            settle(request, exc=exc)
        else:
            settle(request, value=value)


def _statement_error(exc: psycopg.Error) -> bool:
    """An error of a statement (or one it caused), not of the connection: 57P01 admin
    shutdown and the other errors that end the session are the connection's."""
    if isinstance(exc, psycopg.errors.PipelineAborted):
        return True
    return exc.sqlstate is not None and classify(exc) is not Failure.CONNECTION
