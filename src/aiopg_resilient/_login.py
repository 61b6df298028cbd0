"""Login errors that carry their SQLSTATE, whatever language the server speaks.

libpq reports a failed login (wrong password, no such database, pg_hba, "the database
system is starting up") as text only: psycopg's `OperationalError` has no SQLSTATE
there, and the text is in the server's ``lc_messages``. Telling a configuration error
(fail the callers at once, back off hard) from a server that is starting up (probe again
in 0.15 s) must not depend on the server speaking English. So the layer connects with
libpq's error verbosity raised for the handshake only (its messages then carry the
SQLSTATE), reads the code, puts the verbosity back, and raises the error with the code:
an instance of psycopg's class for it where that is an `OperationalError`
(``psycopg.errors.InvalidPassword`` for 28P01...), else an `OperationalError` subclass
with ``sqlstate`` set. The message is libpq's, as usual.

Raising the verbosity needs libpq's ``PQsetErrorVerbosity``, which psycopg does not
expose: it is called through ctypes on the libpq psycopg has loaded. Where that libpq
cannot be found (no ``/proc/self/maps``), login errors keep psycopg's form and are
classified by their English text.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any

import psycopg
from psycopg import errors, pq
from psycopg.abc import PQGenConn
from psycopg.pq import ConnStatus, PollingStatus
from psycopg.waiting import Wait

from . import _libpq as libpq

__all__ = ["LoginError", "login_error", "refused_at_login", "start"]

logger = logging.getLogger("aiopg_resilient.pool")

_VERBOSE = 2  # PQERRORS_VERBOSE: SQLSTATE and LOCATION in the message
_DEFAULT = 1  # PQERRORS_DEFAULT
# "... failed: FATAL:  28P01: password authentication failed..." in any language: the
# severity is translated, the code is not. Only right after the first "failed: " of a
# line (or at its start): a name quoted later in the message cannot pass for a code.
_CODE = re.compile(r"^((?:[^\n]*? failed: )?[^:\n]+:  )([0-9A-Z]{5}): ", re.MULTILINE)
# libpq's "LOCATION:  auth_failed, auth.c:323" line, whatever its language.
_LOCATION = re.compile(r"^[^\n]*, [\w.]+\.c ?: ?\d+$\n?", re.MULTILINE)
# Login failures that are not the server's configuration: retried like a busy server.
_TRANSIENT_CLASSES = ("08", "53", "57")


def _verbosity(pgconn: pq.abc.PGconn, level: int) -> None:
    libpq.call("PQsetErrorVerbosity", pgconn, level)


class LoginError(psycopg.OperationalError):
    """A login refused with a SQLSTATE whose psycopg class is not an `OperationalError`
    (3D000 no such database, 42501 no CONNECT privilege, 55000 database not accepting
    connections...): still an `OperationalError`, as psycopg raises login errors."""

    def __reduce__(self) -> Any:
        return (_rebuild, (self.sqlstate, str(self)))


LoginError.__module__ = "aiopg_resilient"


def _rebuild(sqlstate: str | None, message: str) -> psycopg.OperationalError:
    exc = _error_class(sqlstate or "")(message)
    exc.sqlstate = sqlstate
    return exc


@functools.cache
def _error_class(sqlstate: str) -> type[psycopg.OperationalError]:
    """The class of a login error with *sqlstate*: psycopg's own when it is an
    `OperationalError` (``InvalidPassword``...), else a `LoginError`."""
    try:
        known = errors.lookup(sqlstate)
    except KeyError:
        known = None
    if known is not None and issubclass(known, psycopg.OperationalError):
        return known
    return LoginError


def refused_at_login(exc: BaseException) -> bool:
    """A login error with a SQLSTATE that says the server refuses this login (wrong
    credentials, database, privilege...), not that it is busy, starting or going away."""
    state = getattr(exc, "sqlstate", None)
    return (
        getattr(exc, "login", False) is True
        and isinstance(state, str)
        and not state.startswith(_TRANSIENT_CLASSES)
    )


def login_error(message: str) -> psycopg.OperationalError:
    """The error for libpq's *message* of a failed login (verbose form or not)."""
    codes = [m.group(2) for m in _CODE.finditer(message)]
    if not codes:
        return psycopg.OperationalError(message)
    text = _LOCATION.sub("", _CODE.sub(r"\1", message)).rstrip("\n")
    exc = _error_class(codes[-1])(text)
    exc.sqlstate = codes[-1]
    exc.login = True  # type: ignore[attr-defined]
    return exc


def start(conninfo: str, timeout: float = 0.0) -> PQGenConn[pq.abc.PGconn]:
    """Connect without blocking, as psycopg's own generator does, with the verbosity
    raised during the handshake (see the module doc)."""
    deadline = time.monotonic() + timeout if timeout else 0.0
    conn = pq.PGconn.connect_start(conninfo.encode())
    try:
        _verbosity(conn, _VERBOSE)
        while True:
            if conn.status == ConnStatus.BAD:
                raise psycopg.OperationalError(f"connection is bad: {conn.get_error_message()}")
            status = conn.connect_poll()
            if status == PollingStatus.OK:
                break
            if status in (PollingStatus.READING, PollingStatus.WRITING):
                wait = Wait.R if status == PollingStatus.READING else Wait.W
                while not (yield conn.socket, wait):
                    if deadline and time.monotonic() > deadline:
                        raise errors.ConnectionTimeout("connection timeout expired")
                continue
            message = conn.get_error_message()
            if status == PollingStatus.FAILED:
                raise login_error(f"connection failed: {message}")
            raise psycopg.InternalError(f"unexpected poll status: {status}")
    except BaseException:
        # Whatever ends the attempt (an error, the caller's cancel, the generator being
        # closed) closes the socket now, not when the garbage collector gets to it.
        conn.finish()
        raise
    _verbosity(conn, _DEFAULT)
    conn.nonblocking = 1
    return conn
