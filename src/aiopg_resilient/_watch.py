"""Silent peers mid-query: a statement in flight whose connection stopped answering.

A proxy, a load balancer or a broken path can hold a connection's bytes while both
sockets stay open: the query was answered (or never arrived) and nobody tells the
client. TCP notices after ``tcp_user_timeout`` at best. The layer does not wait that
long, and does not cut a slow query either: each ``patience`` (``heartbeat_timeout``)
without an answer, it looks at the backend from another connection:

- the backend is running the query (``active``, not blocked writing to us): a slow
  query; keep waiting, look again later;
- the backend is gone, idle (it answered; the answer never came), or blocked sending
  the answer (``ClientWrite``): the path is silent. An open transaction on it (a write
  whose COMMIT was never sent) is terminated first, and the layer waits for the backend
  to exit, so a re-run never waits on the locks of its own ghost. Then the statement
  is abandoned (the connection closed) and, being safe to re-run, re-run;
- the look itself fails (the server is unreachable): keep waiting.

Costs: a timer per statement, and one query on another connection per ``patience``
only for statements that are that slow. Not behind a pooler (PgBouncer), where the
backend cannot be told from the client's side: there, the caller's deadline and TCP
settings bound a silent path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from ._driver import DriverConnection

__all__ = ["SilentPeer", "watched"]

logger = logging.getLogger("aiopg_resilient.pool")

T = TypeVar("T")
SideQuery = Callable[[str, dict[str, Any]], Awaitable[Any]]

_LOOK = (
    "SELECT state, wait_event, backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = %(pid)s"
)
# Only a backend that is not working for anyone (its client is gone or silent).
_TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %(pid)s AND (state <> 'active' OR wait_event = 'ClientWrite')"
)


class SilentPeer(Exception):
    """The connection went silent with a statement in flight (see the module doc)."""


def silent(row: Any) -> bool:
    """From a row of the look (None if the backend is gone): is the path silent?"""
    if row is None:
        return True
    state, wait_event, _ = row
    return bool(state != "active" or wait_event == "ClientWrite")


async def watched(
    conn: DriverConnection,
    op: Callable[[DriverConnection], Awaitable[T]],
    side_query: SideQuery,
    patience: float,
) -> T:
    """``await op(conn)``, abandoned with `SilentPeer` if the path goes silent."""
    if conn.pooled:
        return await op(conn)
    loop = asyncio.get_running_loop()
    pid = conn.info.backend_pid
    verdict: list[str] = []
    watcher: list[asyncio.Task[None]] = []
    with anyio.CancelScope() as scope:

        def start() -> None:
            watcher.append(asyncio.ensure_future(_watch(pid, side_query, patience, scope, verdict)))

        timer = loop.call_later(patience, start)
        try:
            return await op(conn)
        finally:
            timer.cancel()
            for task in watcher:
                task.cancel()
    raise SilentPeer(verdict[0] if verdict else "no answer and the backend is not working")


async def _watch(
    pid: int,
    side_query: SideQuery,
    patience: float,
    scope: anyio.CancelScope,
    verdict: list[str],
) -> None:
    while True:
        try:
            with anyio.fail_after(2 * patience):
                row = await side_query(_LOOK, {"pid": pid})
                if silent(row) and row is not None and row[0] != "idle":
                    # A transaction may be open on it (a write whose COMMIT was never
                    # sent): it must end before the statement is re-run.
                    await side_query(_TERMINATE, {"pid": pid})
                    while (gone := await side_query(_LOOK, {"pid": pid})) is not None:
                        if not silent(gone):
                            raise RuntimeError(f"backend {pid} is working again")
                        await anyio.sleep(0.02)
                    row = None
        except Exception as exc:  # cannot look (or end it): keep waiting for the answer
            logger.debug("cannot look at backend %s (%s); still waiting", pid, exc)
        else:
            if silent(row):
                state = "gone" if row is None else f"{row[0]}, {row[1]}"
                verdict.append(
                    f"no answer for {patience:.3g}s and backend {pid} is not working on the "
                    f"statement ({state}): the path to the server is silent"
                )
                logger.warning("connection silent: %s", verdict[0])
                scope.cancel()
                return
        await anyio.sleep(patience)
