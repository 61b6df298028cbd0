"""Zero-round-trip liveness check of an idle psycopg connection."""

from __future__ import annotations

import select
from typing import Any

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

__all__ = ["looks_alive"]

_HAVE_POLL = hasattr(select, "poll")


def _readable(fd: int) -> bool:
    if _HAVE_POLL:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def looks_alive(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection still looks usable, without a round trip.

    An idle connection should receive nothing. When the server terminated it (restart,
    ``pg_terminate_backend``, failover) or a proxy cut it, a FATAL message, a TLS
    close_notify, a FIN or a RST is already waiting on the socket: read it, and libpq
    marks the connection bad. A half-open connection (peer gone without a word) still
    looks alive here; the heartbeat and TCP keepalives catch those.
    """
    if conn.closed or conn.broken:
        return False
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK or pgconn.transaction_status != TransactionStatus.IDLE:
        return False
    try:
        # A terminated backend sends a FATAL message (which libpq files as a notice on an
        # idle connection) and then closes: read until the socket is quiet or closed.
        for _ in range(4):
            if not _readable(pgconn.socket):
                break
            pgconn.consume_input()
    except (psycopg.OperationalError, OSError, ValueError):
        return False
    return pgconn.status == ConnStatus.OK
