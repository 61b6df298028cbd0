"""The server's role as a connection sees it, without a round trip.

PostgreSQL reports ``in_hot_standby`` (14+) and ``default_transaction_read_only`` to every
session when they change. A connection made to a primary that later reports either as
``on`` is on a server that no longer takes writes: a primary fenced by its HA tooling
(``ALTER SYSTEM SET default_transaction_read_only = on`` + reload) or a standby. Such a
connection is dropped, never "fixed" by a ``SET`` (that would undo the fence and let
writes land on the old primary), and the other idle connections are checked at once.

A write that fails with 25006 on a server in recovery also tells the pool that a primary
is wanted: with a multi-host conninfo and no ``target_session_attrs``, new connections
ask libpq for ``target_session_attrs=read-write`` from then on.
"""

from __future__ import annotations

import psycopg

from ._conninfo import validate

__all__ = ["RoleChanged", "drifted", "offers_alternatives", "prefer_primary", "wrong_server"]

_ON = b"on"
_READ_ONLY = "25006"


class RoleChanged(psycopg.OperationalError):
    """The server behind a connection stopped taking writes (internal cause of a loss)."""


def drifted(
    baseline: tuple[bytes | None, bytes | None], now: tuple[bytes | None, bytes | None]
) -> str | None:
    """What changed towards read-only between the reported (in_hot_standby,
    default_transaction_read_only) at connect and now, or None."""
    standby_then, read_only_then = baseline
    standby_now, read_only_now = now
    if standby_now == _ON and standby_then != _ON:
        return "the server is a standby now (in_hot_standby = on)"
    if read_only_now == _ON and read_only_then is not None and read_only_then != _ON:
        return (
            "default_transaction_read_only turned on (the server fenced writes, or a "
            "borrower's SET): the connection is dropped, not SET back"
        )
    return None


def wrong_server(exc: BaseException) -> bool:
    """A write refused because the server is in recovery (see `_failures.failure_of`)."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == _READ_ONLY


def offers_alternatives(conninfo: str) -> bool:
    """Whether *conninfo* names several hosts and leaves the session's role open."""
    params = validate(conninfo)
    hosts = params.get("host") or params.get("hostaddr") or ""
    return "," in hosts and params.get("target_session_attrs", "any") == "any"


def prefer_primary(conninfo: str) -> str:
    """*conninfo* asking for a read-write session, if it names several hosts and leaves
    the session's role open; else unchanged."""
    if not offers_alternatives(conninfo):
        return conninfo
    return psycopg.conninfo.make_conninfo(conninfo, target_session_attrs="read-write")
