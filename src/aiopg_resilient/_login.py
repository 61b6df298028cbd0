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

import ctypes
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

__all__ = ["login_error", "start"]

logger = logging.getLogger("aiopg_resilient.pool")

_VERBOSE = 2  # PQERRORS_VERBOSE: SQLSTATE and LOCATION in the message
_DEFAULT = 1  # PQERRORS_DEFAULT
# "FATAL:  28P01: password authentication failed..." in any language: the severity is
# translated, the code is not.
_CODE = re.compile(r"(^|: )([^:\n]+:  )([0-9A-Z]{5}): ", re.MULTILINE)
_LOCATION = re.compile(r"^[^:\n]+:  [A-Za-z_0-9]+, [^\n]*\.c:\d+\n?", re.MULTILINE)


@functools.cache
def _set_verbosity() -> Any:
    """libpq's PQsetErrorVerbosity from the libpq psycopg uses, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libpq" in line}
    except OSError:
        return None
    bundled = pq.__impl__ == "binary"
    for path in sorted(paths):
        if ("psycopg_binary" in path) == bundled:
            try:
                func = ctypes.CDLL(path).PQsetErrorVerbosity
            except (OSError, AttributeError):
                continue
            func.argtypes = [ctypes.c_void_p, ctypes.c_int]
            func.restype = ctypes.c_int
            return func
    logger.debug("libpq not found in /proc/self/maps: login errors classified by text")
    return None


def _verbosity(pgconn: pq.abc.PGconn, level: int) -> None:
    func = _set_verbosity()
    pointer = getattr(pgconn, "pgconn_ptr", None)  # in every implementation, not the abc
    if func is not None and pointer is not None:
        func(pointer, level)


@functools.cache
def _error_class(sqlstate: str) -> type[psycopg.OperationalError]:
    """An `OperationalError` class for a login error with *sqlstate*."""
    try:
        known = errors.lookup(sqlstate)
    except KeyError:
        known = None
    if known is not None and issubclass(known, psycopg.OperationalError):
        return known
    name = known.__name__ if known is not None else f"LoginError{sqlstate}"
    bases = (psycopg.OperationalError,) + ((known,) if known is not None else ())
    cls = type(name, bases, {"sqlstate": sqlstate, "__module__": "aiopg_resilient"})
    return cls


def login_error(message: str) -> psycopg.OperationalError:
    """The error for libpq's *message* of a failed login (verbose form or not)."""
    codes = [m.group(3) for m in _CODE.finditer(message)]
    if not codes:
        return psycopg.OperationalError(message)
    text = _LOCATION.sub("", _CODE.sub(r"\1\2", message)).rstrip("\n")
    exc = _error_class(codes[-1])(text)
    exc.sqlstate = codes[-1]
    return exc


def start(conninfo: str, timeout: float = 0.0) -> PQGenConn[pq.abc.PGconn]:
    """Connect without blocking, as psycopg's own generator does, with the verbosity
    raised during the handshake (see the module doc)."""
    deadline = time.monotonic() + timeout if timeout else 0.0
    conn = pq.PGconn.connect_start(conninfo.encode())
    _verbosity(conn, _VERBOSE)
    while True:
        if conn.status == ConnStatus.BAD:
            message = conn.get_error_message()
            conn.finish()
            raise psycopg.OperationalError(f"connection is bad: {message}")
        status = conn.connect_poll()
        if status == PollingStatus.OK:
            break
        if status in (PollingStatus.READING, PollingStatus.WRITING):
            wait = Wait.R if status == PollingStatus.READING else Wait.W
            while not (yield conn.socket, wait):
                if deadline and time.monotonic() > deadline:
                    conn.finish()
                    raise errors.ConnectionTimeout("connection timeout expired")
            continue
        message = conn.get_error_message()
        conn.finish()
        if status == PollingStatus.FAILED:
            raise login_error(f"connection failed: {message}")
        raise psycopg.InternalError(f"unexpected poll status: {status}")
    _verbosity(conn, _DEFAULT)
    conn.nonblocking = 1
    return conn
