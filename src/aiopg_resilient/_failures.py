"""What an error raised while a connection was in use means for that connection.

Only a failure of the connection itself counts (guarantee 10): an exception of the
caller's code, an error of the statement, or the caller's own deadline cancelling a query
is the caller's. 25006 (read-only transaction) is the wrong server only when the server
is in recovery (a demoted primary, or a standby the conninfo offers alternatives to); by
the user's choice (a read-only setting, a pool on a standby) it is the statement's error.
"""

from __future__ import annotations

import psycopg
from psycopg.pq import TransactionStatus

from ._driver import DriverConnection, tuple_cursor
from ._errors import Failure, classify
from ._watch import SilentPeer

__all__ = ["failure_of", "is_conflict"]

_READ_ONLY = "25006"


async def failure_of(conn: DriverConnection, exc: BaseException) -> Failure | None:
    """Whether *exc*, raised while *conn* was in use, is a failure of the connection:
    CONNECTION (it is gone), WRONG_ROLE (the server is a standby now), or None (the
    statement's or the caller's own error: the connection is fine)."""
    if isinstance(exc, SilentPeer):
        return Failure.CONNECTION  # abandoned by the layer: the path went silent
    if conn.closed:
        # Closed because the caller's own deadline cancelled a query: the caller's.
        return None if conn.interrupted else Failure.CONNECTION
    # Read-only by the user's choice (default_transaction_read_only, SET TRANSACTION READ
    # ONLY) is the statement's error; on a server in recovery, the wrong server.
    if isinstance(exc, psycopg.Error) and exc.sqlstate == _READ_ONLY and await _in_recovery(conn):
        # A connection made to a standby, with no other server in the conninfo: the user
        # pointed the pool at a standby, and a write there is the statement's error.
        made_to_standby = conn.role_baseline()[0] == b"on"
        if made_to_standby and not conn.alternatives:
            return None
        return Failure.WRONG_ROLE
    return Failure.CONNECTION if conn.closed and not conn.interrupted else None


async def _in_recovery(conn: DriverConnection) -> bool:
    standby = conn.info.parameter_status("in_hot_standby")  # reported by PostgreSQL 14+
    if standby is not None:
        return standby == "on"
    try:
        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
            await conn.plain_rollback()
        cur = tuple_cursor(conn)
        await cur.execute("SELECT pg_is_in_recovery()", prepare=False)
        row = await cur.fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


def is_conflict(exc: BaseException) -> bool:
    """A serialization failure or a deadlock: the transaction may be re-run."""
    return isinstance(exc, psycopg.Error) and classify(exc) is Failure.TRANSACTION
