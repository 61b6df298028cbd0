"""Silent peers mid-query: a statement in flight whose connection stopped answering.

A proxy, a load balancer or a broken path can hold a connection's bytes while both
sockets stay open: the query was answered (or never arrived) and nobody tells the
client. TCP notices after ``tcp_user_timeout`` at best. The layer does not wait that
long, and does not cut a slow query either: each ``patience`` (``heartbeat_timeout``)
without an answer, it looks at the backend (`_look`) and at the client's socket:

- data went either way on the socket within ``patience`` (a big result read slowly, a
  big parameter uploaded slowly): the answer is on its way; wait;
- the backend is running the query (``active``, not waiting on the client), or the look
  cannot tell (another server answers there, ``track_activities`` is off): wait;
- the backend is gone, or done (``idle``, ``idle in transaction``), or waiting on the
  client (``ClientRead``/``ClientWrite``) while nothing moves on the socket: the path is
  silent. A backend that is not idle (a transaction open: a write whose COMMIT was never
  sent, holding its locks) is terminated first, and the layer waits until it is gone, so
  a re-run never waits on its own ghost. Then the statement is abandoned (its connection
  closed) and, being safe to re-run, re-run.

Where the socket cannot be read (not Linux, a Unix socket), "done" or "gone" is taken
as silent and "waiting on the client" as working. Costs: a timer per statement, and for
statements slower than ``patience`` one query per server per half ``patience`` on one
connection of the looker's own. Not behind a pooler (PgBouncer), where the backend cannot
be identified from the client: there, the caller's deadline and TCP settings bound it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import psycopg

from ._driver import DriverConnection
from ._look import CANNOT, Looker, Watched

__all__ = ["SilentPeer", "quiet_for", "silent", "watched"]

logger = logging.getLogger("aiopg_resilient.pool")

T = TypeVar("T")

# A request this big may take a while to cross a path that buffers it (see `silent`).
_BIG = 256 * 1024
# struct tcp_info: ms since data was last sent and received, at these offsets.
_LAST_DATA_SENT = 44
_LAST_DATA_RECV = 52


class SilentPeer(Exception):
    """The connection went silent with a statement in flight (see the module doc)."""


def silent(
    row: Any,
    quiet: float | None,
    patience: float,
    *,
    running: float = 0.0,
    big: bool = False,
) -> bool:
    """From the look (``(state, wait_event, seconds in that state)``, None if the
    backend is gone, or `CANNOT`), how long nothing moved on the client's socket (*quiet*,
    None if unknown), how long the statement has been out (*running*) and whether its
    request is big: is the path silent?

    A big request (a large parameter) may still be on its way through a middlebox that
    buffers it, so a backend that has not got all of it yet (idle since before the
    statement was sent, or reading) is not proof of silence."""
    if row is CANNOT:
        return False
    if quiet is not None and quiet < patience:
        return False  # data is moving: the answer (or the question) is on its way
    if row is None:
        return True
    state, wait_event, age = row
    if state == "idle" or (isinstance(state, str) and state.startswith("idle in transaction")):
        arrived = age is None or float(age) < running
        return arrived or not big
    if state == "active" and wait_event == "ClientRead":
        return quiet is not None and not big
    if state == "active" and wait_event == "ClientWrite":
        return quiet is not None  # both sides wait on the other, nothing moves
    return False  # working on it, or the server will not say (disabled, hidden)


def quiet_for(fd: int) -> float | None:
    """Seconds since data last moved either way on TCP socket *fd* (Linux ``TCP_INFO``),
    or None if that cannot be known."""
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
    sent = struct.unpack_from("I", info, _LAST_DATA_SENT)[0]
    received = struct.unpack_from("I", info, _LAST_DATA_RECV)[0]
    return float(min(sent, received)) / 1000.0


async def watched(
    conn: DriverConnection,
    op: Callable[[DriverConnection], Awaitable[T]],
    looker: Looker | None,
    patience: float,
    size: Callable[[], int] = lambda: 0,
) -> T:
    """``await op(conn)``, abandoned with `SilentPeer` if the path goes silent. *size*
    tells (when asked) about how many bytes the request is."""
    if looker is None or conn.pooled or conn.identity is None or conn.backend_start is None:
        return await op(conn)
    identity, start_text = conn.identity[:2], conn.backend_start
    verdict: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    watching: list[Watched] = []
    with anyio.CancelScope() as scope:

        def start() -> None:
            # Only for a statement slower than patience: what the look needs is read now,
            # while the statement is still out on this very socket.
            try:
                info = conn.info
                target = (info.host, info.hostaddr, str(info.port))
                me = Watched(target, identity, info.backend_pid, start_text)
                fd = conn.pgconn.socket
            except psycopg.OperationalError:
                return  # (the statement will find out)
            watching.append(me)
            task = _watch(me, fd, looker, patience, scope, verdict, started, size)
            tasks.append(asyncio.ensure_future(task))

        started = time.monotonic()
        timer = asyncio.get_running_loop().call_later(patience, start)
        try:
            return await op(conn)
        finally:
            timer.cancel()
            verdict.append("")  # tells the watcher to stop, should a cancel be swallowed
            for task in tasks:
                task.cancel()
            for me in watching:
                with anyio.CancelScope(shield=True):  # even when cancelled: no leak
                    await looker.unwatch(me)
    raise SilentPeer(verdict[0] or "no answer, and the backend is not working on it")


async def _watch(
    me: Watched,
    fd: int,
    looker: Looker,
    patience: float,
    scope: anyio.CancelScope,
    verdict: list[str],
    started: float,
    size: Callable[[], int],
) -> None:
    looker.watch(me)
    big = size() > _BIG
    while not verdict:  # (the statement's end appends to it, and cancels this task)
        row = await looker.look(me)
        # (The statement still waits: had it ended, this task would have been cancelled
        # at the await above, so *fd* is still the statement's socket.)
        quiet, running = quiet_for(fd), time.monotonic() - started
        if verdict:
            return
        ended = row is None or (row is not CANNOT and row[0] == "idle")
        if silent(row, quiet, patience, running=running, big=big) and (
            ended or await looker.terminate(me)
        ):
            state = "gone" if row is None else f"{row[0]}, {row[1]}"
            verdict.append(
                f"no answer for {patience:.3g}s, nothing moving on the socket, and "
                f"backend {me.pid} is not working on the statement ({state}): the "
                "path to the server is silent"
            )
            logger.warning("connection silent: %s", verdict[0])
            scope.cancel()
            return
        await anyio.sleep(patience / 2)
