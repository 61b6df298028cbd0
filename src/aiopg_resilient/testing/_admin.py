"""Superuser SQL for the test servers: one-statement queries, polls, terminating backends.

Each helper opens its own short connection with the backend's ``admin_conninfo`` (the Unix
socket for a local server) in autocommit, so it works whatever state the tests left their
own connections in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import psycopg

if TYPE_CHECKING:
    from psycopg.sql import SQL, Composed

logger = logging.getLogger("aiopg_resilient.testing")

Params: TypeAlias = "Sequence[Any] | Mapping[str, Any] | None"


def _query(
    conninfo: str, sql: str | SQL | Composed, params: Params = None
) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit on a new connection; return its rows (``[]`` if none)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


def _wait_until(conninfo: str, sql: str, params: Params, *, timeout: float, what: str) -> None:
    """Run a one-value query every few milliseconds until it returns true.

    Raises:
        TimeoutError: naming ``what`` if it is still false after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while True:
            row = conn.execute(sql, params).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.01)


def _terminate_backends(conninfo: str, application_name: str | None) -> int:
    """``pg_terminate_backend`` every client backend but our own; wait until they are gone."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        pids = [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                " AND (%(name)s::text IS NULL OR application_name = %(name)s)",
                {"name": application_name},
            )
        ]
        if not pids:
            return 0
        # Signal them all at once (as a restart or a failover would), then wait until
        # every one has exited, so callers see the outcome when this returns.
        killed = len(
            [
                ok
                for (ok,) in conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", [pids]
                )
                if ok
            ]
        )
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s::int[])", [pids]
            ).fetchone()
            if row is None or row[0] == 0:
                break
            time.sleep(0.005)
    logger.info("terminated %d PostgreSQL backend(s)", killed)
    return killed
