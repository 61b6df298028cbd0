"""Public exceptions and the one table that says what an error means: `classify`."""

from __future__ import annotations

import enum
import ssl

import psycopg

from ._login import refused_at_login

__all__ = [
    "CommitUnknown",
    "ConfigureError",
    "ConnectionLost",
    "DatabaseUnavailable",
    "Failure",
    "PoolClosed",
    "PoolTimeout",
    "classify",
    "is_disconnect",
]


class ConnectionLost(psycopg.OperationalError):
    """The connection died inside a block the layer cannot replay.

    Raised by `transaction()` when the connection is lost before COMMIT (nothing was
    applied), by ``execute()`` with ``in_doubt="raise"`` and by ``connection()`` blocks.
    The underlying driver error is ``__cause__``.
    """


class CommitUnknown(psycopg.OperationalError):
    """A COMMIT was sent but its outcome could not be established.

    Raised when the connection died while a COMMIT was in flight and the transaction's
    status cannot be learnt exactly (``in_doubt="raise"``, the id is too old, or the
    server is another timeline after a failover). ``xid`` is the transaction id
    (``pg_current_xact_id_if_assigned()``) or ``None`` when it was never learnt.
    """

    def __init__(self, message: str, *, xid: int | None = None) -> None:
        super().__init__(message)
        self.xid = xid


class DatabaseUnavailable(psycopg.OperationalError):
    """The database stayed unreachable for the whole retry budget.

    ``attempts`` is the number of attempts made by this operation and ``last_error``
    the last underlying error (also the ``__cause__``).
    """

    def __init__(
        self, message: str, *, attempts: int = 0, last_error: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class PoolTimeout(psycopg.OperationalError):
    """No connection became free within ``acquire_timeout`` while the database was up."""


class PoolClosed(psycopg.OperationalError):
    """The pool is closed (or was never opened)."""


class ConfigureError(psycopg.ProgrammingError):
    """``configure()`` failed on a new connection (a SQL error, or it left a transaction
    open): a configuration error, raised by ``open()`` and to waiting callers at once,
    never retried in a loop. The error ``configure()`` raised is ``__cause__``."""


for _cls in (
    ConnectionLost,
    CommitUnknown,
    DatabaseUnavailable,
    PoolTimeout,
    PoolClosed,
    ConfigureError,
):
    _cls.__module__ = "aiopg_resilient"


class Failure(enum.Enum):
    """What an error means for the layer; see `classify`."""

    CONNECTION = "connection"
    """The connection is gone: retried on a fresh connection when safe."""
    SERVER_BUSY = "server_busy"
    """The server refuses connections for now (starting up, too many clients)."""
    WRONG_ROLE = "wrong_role"
    """Read-only server where a primary is wanted: retried after reconnecting."""
    TRANSACTION = "transaction"
    """Serialization failure or deadlock: `run_transaction` re-runs the transaction."""
    FATAL = "fatal"
    """Bad configuration (auth, database, DSN, SSL): never retried."""
    STATEMENT = "statement"
    """An error of the statement itself: never retried, the connection stays healthy."""

    @property
    def retryable(self) -> bool:
        """Whether the layer may retry after this failure (when replay is safe)."""
        return self in (Failure.CONNECTION, Failure.SERVER_BUSY, Failure.WRONG_ROLE)

    __module__ = "aiopg_resilient"


_SQLSTATE_FAILURES: dict[str, Failure] = {
    "28000": Failure.FATAL,  # invalid_authorization_specification (pg_hba, no role)
    "28P01": Failure.FATAL,  # invalid_password
    "3D000": Failure.FATAL,  # invalid_catalog_name: no such database
    "57P04": Failure.FATAL,  # database_dropped
    "57P01": Failure.CONNECTION,  # admin_shutdown: terminate, restart -m fast, failover
    "57P02": Failure.CONNECTION,  # crash_shutdown: another backend crashed
    "57P05": Failure.CONNECTION,  # idle_session_timeout
    "25P03": Failure.CONNECTION,  # idle_in_transaction_session_timeout (an InternalError)
    "25P04": Failure.CONNECTION,  # transaction_timeout, PG 17 (an InternalError)
    "57P03": Failure.SERVER_BUSY,  # cannot_connect_now: starting up / shutting down
    "53300": Failure.SERVER_BUSY,  # too_many_connections
    "25006": Failure.WRONG_ROLE,  # read_only_sql_transaction: a demoted primary
    "40001": Failure.TRANSACTION,  # serialization_failure
    "40P01": Failure.TRANSACTION,  # deadlock_detected
}

# PgBouncer reports its own disconnects as 08P01 with these texts; other 08P01s from it
# ("no more connections allowed") mean busy.
_PGBOUNCER_BUSY = (
    "no more connections allowed",
    "pgbouncer cannot connect to server",
    "server login has been failing",  # the server is down or restarting behind it
)

# Texts of errors raised by libpq or psycopg without a SQLSTATE, lower case, checked in
# order: configuration problems first, so they are never retried.
_TEXT_FAILURES: tuple[tuple[str, Failure], ...] = (
    ("password authentication failed", Failure.FATAL),
    ("no pg_hba.conf entry", Failure.FATAL),
    ("pg_hba.conf rejects connection", Failure.FATAL),
    ("does not exist", Failure.FATAL),  # database "x" / role "x" does not exist
    ("server does not support ssl", Failure.FATAL),
    ("ssl is not enabled on the server", Failure.FATAL),
    ("certificate verify failed", Failure.FATAL),
    ("server certificate for", Failure.FATAL),  # "... does not match host name"
    ("root certificate file", Failure.FATAL),
    ("could not read root certificate", Failure.FATAL),
    ("invalid connection option", Failure.FATAL),
    ("invalid dsn", Failure.FATAL),
    ('missing "=" after', Failure.FATAL),
    ("invalid sslmode value", Failure.FATAL),
    ("invalid integer value", Failure.FATAL),
    ("invalid port number", Failure.FATAL),
    ("invalid uri", Failure.FATAL),
    ("invalid percent-encoded token", Failure.FATAL),
    ("unterminated quoted string", Failure.FATAL),
    ("fe_sendauth: no password supplied", Failure.FATAL),
    ("sorry, too many clients already", Failure.SERVER_BUSY),
    ("remaining connection slots are reserved", Failure.SERVER_BUSY),
    ("too many connections", Failure.SERVER_BUSY),
    ("the database system is starting up", Failure.SERVER_BUSY),
    ("the database system is shutting down", Failure.SERVER_BUSY),
    ("the database system is in recovery mode", Failure.SERVER_BUSY),
    ("the database system is not yet accepting connections", Failure.SERVER_BUSY),
    ("the database system is not accepting connections", Failure.SERVER_BUSY),
    ("no more connections allowed", Failure.SERVER_BUSY),
    ("session is read-only", Failure.WRONG_ROLE),  # target_session_attrs=read-write
    ("server is in hot standby mode", Failure.WRONG_ROLE),
    ("session is not read-only", Failure.WRONG_ROLE),
    ("server is not in hot standby mode", Failure.WRONG_ROLE),
)


def _sqlstate(exc: BaseException) -> str | None:
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate
    return None


def classify(exc: BaseException) -> Failure:
    """Say what *exc* means for the layer: one `Failure` from one table.

    ======================  ==========================================================
    Failure                 Examples
    ======================  ==========================================================
    ``CONNECTION``          "SSL connection has been closed unexpectedly", "SSL SYSCALL
                            error: EOF detected", "server closed the connection
                            unexpectedly", "the connection is closed", SQLSTATE 08*,
                            57P01/02/05, 25P03/25P04, PgBouncer 08P01 timeouts, refused
                            or timed-out connects, `ConnectionLost`
    ``SERVER_BUSY``         57P03 "the database system is starting up", 53300
    ``WRONG_ROLE``          25006 read-only transaction; a standby where a primary is wanted
    ``TRANSACTION``         40001 serialization failure, 40P01 deadlock
    ``FATAL``               28P01/28000 auth, 3D000 no database, malformed DSN, SSL mismatch,
                            `CommitUnknown`, `PoolClosed`, `ConfigureError`
    ``STATEMENT``           anything else: the statement failed, the connection is fine
    ======================  ==========================================================

    Note that psycopg maps 25P03/25P04 to ``InternalError``, not ``OperationalError``.
    """
    if isinstance(exc, (ConnectionLost, DatabaseUnavailable)):
        return Failure.CONNECTION
    if isinstance(exc, (CommitUnknown, PoolClosed, ConfigureError)):
        return Failure.FATAL
    if isinstance(exc, PoolTimeout):
        return Failure.SERVER_BUSY
    state = _sqlstate(exc)
    if state is not None:
        failure = _SQLSTATE_FAILURES.get(state)
        if failure is not None:
            return failure
        if refused_at_login(exc):
            return Failure.FATAL  # 42501 no CONNECT privilege, 55000 datallowconn off...
        if state.startswith("08"):
            if state == "08P01" and any(t in str(exc).lower() for t in _PGBOUNCER_BUSY):
                return Failure.SERVER_BUSY
            return Failure.CONNECTION
        return Failure.STATEMENT
    if isinstance(exc, psycopg.OperationalError):
        text = str(exc).lower()
        for needle, failure in _TEXT_FAILURES:
            if needle in text:
                return failure
        # Everything else libpq raises without a SQLSTATE is about the connection:
        # EOFs, closed sockets, refused or timed-out connects, SSL read errors.
        return Failure.CONNECTION
    if isinstance(exc, psycopg.InterfaceError) and "closed" in str(exc).lower():
        return Failure.CONNECTION
    if isinstance(exc, psycopg.ProgrammingError) and (
        "connection info string" in str(exc) or "invalid dsn" in str(exc).lower()
    ):
        return Failure.FATAL
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return Failure.FATAL
    if isinstance(exc, (OSError, TimeoutError, EOFError)):
        return Failure.CONNECTION
    return Failure.STATEMENT


def is_disconnect(exc: BaseException) -> bool:
    """True when *exc* means the connection is gone (`Failure.CONNECTION`)."""
    return classify(exc) is Failure.CONNECTION
