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
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import psycopg

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


# struct tcp_info: tcpi_last_data_recv (ms since data last arrived) is at this offset.
_LAST_DATA_RECV = 52


class SilentPeer(Exception):
    """The connection went silent with a statement in flight (see the module doc)."""


def silent(row: Any, quiet: float | None, patience: float) -> bool:
    """From a row of the look (None if the backend is gone), and how long nothing has
    arrived on the client's socket (*quiet*, None if unknown): is the path silent?

    A backend that is gone, or done (idle), while nothing arrives: silent. A backend
    blocked sending (``ClientWrite``) may be feeding a big result to a client that reads
    it slowly: silent only if nothing has arrived for *patience* either; when that cannot
    be known (not Linux, a Unix socket), it is taken as working.
    """
    if row is None:
        return True
    state, wait_event, _ = row
    if quiet is not None and quiet < patience:
        return False  # data is arriving: the answer is on its way
    if state != "active":
        return True
    return wait_event == "ClientWrite" and quiet is not None


def quiet_for(fd: int) -> float | None:
    """Seconds since data last arrived on TCP socket *fd* (Linux ``TCP_INFO``), or None."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None or fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            info = sock.getsockopt(socket.IPPROTO_TCP, option, 104)
    except OSError:
        return None
    if len(info) < _LAST_DATA_RECV + 4:
        return None
    return float(struct.unpack_from("I", info, _LAST_DATA_RECV)[0]) / 1000.0


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
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        fd = -1  # (the statement will find out)
    verdict: list[str] = []
    watcher: list[asyncio.Task[None]] = []
    with anyio.CancelScope() as scope:

        def start() -> None:
            watcher.append(
                asyncio.ensure_future(_watch(pid, fd, side_query, patience, scope, verdict))
            )

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
    fd: int,
    side_query: SideQuery,
    patience: float,
    scope: anyio.CancelScope,
    verdict: list[str],
) -> None:
    while True:
        try:
            with anyio.fail_after(2 * patience):
                row = await side_query(_LOOK, {"pid": pid})
                # (The statement still waits: had it ended, this task would be cancelled
                # at the await above, so *fd* is still the statement's socket.)
                quiet = quiet_for(fd)
                if silent(row, quiet, patience) and row is not None and row[0] != "idle":
                    # A transaction may be open on it (a write whose COMMIT was never
                    # sent): it must end before the statement is re-run.
                    await side_query(_TERMINATE, {"pid": pid})
                    while (gone := await side_query(_LOOK, {"pid": pid})) is not None:
                        if not silent(gone, None, patience):
                            raise RuntimeError(f"backend {pid} is working again")
                        await anyio.sleep(0.02)
                    row = None
        except Exception as exc:  # cannot look (or end it): keep waiting for the answer
            logger.debug("cannot look at backend %s (%s); still waiting", pid, exc)
        else:
            if silent(row, quiet, patience):
                state = "gone" if row is None else f"{row[0]}, {row[1]}"
                verdict.append(
                    f"no answer for {patience:.3g}s and backend {pid} is not working on the "
                    f"statement ({state}): the path to the server is silent"
                )
                logger.warning("connection silent: %s", verdict[0])
                scope.cancel()
                return
        await anyio.sleep(patience)
