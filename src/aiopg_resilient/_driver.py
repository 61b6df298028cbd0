"""The psycopg connection class the layer uses: cancellation never outlives the caller.

On a cancelled query, psycopg's `AsyncConnection.wait` sends a cancel request and then
waits up to 5 s for the server to answer it (10 s in all). Through a half-open peer the
answer never comes, so a caller whose ``asyncio.timeout()`` fired would stay blocked for
seconds past its deadline. The layer closes a connection cancelled mid-query anyway (its
state is unknown), so this class closes it at once and sends the cancel request to the
server in the background, so that the server stops working on the abandoned query.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection, waiting
from psycopg.abc import RV, PQGen
from psycopg.pq import PollingStatus, TransactionStatus

__all__ = ["DriverConnection"]

logger = logging.getLogger("aiopg_resilient.pool")

_CANCEL_TIMEOUT = 5.0
_background: set[asyncio.Task[None]] = set()
_INTERRUPTS = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class DriverConnection(AsyncConnection[Any]):
    """An `AsyncConnection` that closes at once when cancelled mid-query."""

    async def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        try:
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=timeout
            )
        except _INTERRUPTS:
            if self.pgconn.transaction_status == TransactionStatus.ACTIVE:
                _cancel_in_background(self)
                self.pgconn.finish()
            raise


def _cancel_in_background(conn: AsyncConnection[Any]) -> None:
    """Ask the server to cancel *conn*'s query without waiting for the answer."""
    try:
        if psycopg.capabilities.has_cancel_safe():
            cancel_conn = conn.pgconn.cancel_conn()
            cancel_conn.start()
            task = asyncio.ensure_future(_drive(cancel_conn))
        else:
            pgcancel = conn.pgconn.get_cancel()
            task = asyncio.ensure_future(asyncio.to_thread(pgcancel.cancel))
    except Exception as exc:  # best effort: the connection is being closed anyway
        logger.debug("could not send a cancel request: %s", exc)
        return
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _drive(cancel_conn: Any) -> None:
    """Run libpq's non-blocking cancel connection to completion, for at most 5 s."""
    loop = asyncio.get_running_loop()
    try:
        with anyio.move_on_after(_CANCEL_TIMEOUT):
            while True:
                status = cancel_conn.poll()
                if status not in (PollingStatus.READING, PollingStatus.WRITING):
                    return
                ready: asyncio.Future[None] = loop.create_future()
                fd = cancel_conn.socket

                def wake(fut: asyncio.Future[None] = ready) -> None:
                    if not fut.done():
                        fut.set_result(None)

                if status == PollingStatus.READING:
                    loop.add_reader(fd, wake)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(fd)
                else:
                    loop.add_writer(fd, wake)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(fd)
    except (OSError, psycopg.Error) as exc:
        logger.debug("cancel request not delivered: %s", exc)
    finally:
        cancel_conn.finish()
