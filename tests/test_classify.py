"""classify(): the one error table, checked against real psycopg exception classes."""

from __future__ import annotations

import ssl

import psycopg
import psycopg.errors as pe
import pytest

from aiopg_resilient import (
    CommitUnknown,
    ConnectionLost,
    DatabaseUnavailable,
    Failure,
    PoolClosed,
    PoolTimeout,
    classify,
    is_disconnect,
)

OE = psycopg.OperationalError

# Texts of libpq 18 (psycopg[binary]) and of the system libpq 15 (PSYCOPG_IMPL=python).
DISCONNECT_TEXTS = [
    "consuming input failed: SSL connection has been closed unexpectedly",
    "SSL connection has been closed unexpectedly",
    "consuming input failed: SSL SYSCALL error: EOF detected",
    "SSL SYSCALL error: EOF detected",
    "consuming input failed: SSL error: unexpected eof while reading",
    "sending query and params failed: SSL error: unexpected eof while reading",
    "consuming input failed: server closed the connection unexpectedly\n\tThis probably "
    "means the server terminated abnormally\n\tbefore or while processing the request.",
    "the connection is closed",
    "the connection is lost",
    "consuming input failed: could not receive data from server: Connection reset by peer",
    "sending query failed: could not send data to server: Broken pipe",
    'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
    "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
    "connections?",
    "connection timeout expired",
    "no connection to the server",
]


@pytest.mark.parametrize("text", DISCONNECT_TEXTS)
def test_disconnect_texts(text: str) -> None:
    """libpq's disconnect messages (no SQLSTATE) are CONNECTION failures."""
    assert classify(OE(text)) is Failure.CONNECTION
    assert is_disconnect(OE(text))


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (pe.AdminShutdown("terminating connection due to administrator command"), "CONNECTION"),
        (pe.CrashShutdown("terminating connection because of crash"), "CONNECTION"),
        (pe.IdleSessionTimeout("terminating connection due to idle-session timeout"), "CONNECTION"),
        (pe.ConnectionFailure("x"), "CONNECTION"),  # 08006
        (pe.ProtocolViolation("client_idle_timeout"), "CONNECTION"),  # PgBouncer 08P01
        (pe.ProtocolViolation("query_wait_timeout"), "CONNECTION"),
        (pe.ProtocolViolation("idle transaction timeout"), "CONNECTION"),
        (pe.ProtocolViolation("no more connections allowed (max_client_conn)"), "SERVER_BUSY"),
        (
            pe.ProtocolViolation(
                "server login has been failing, try again later (server_login_retry)"
            ),
            "SERVER_BUSY",
        ),
        (pe.ProtocolViolation("database removed"), "CONNECTION"),  # PgBouncer KILL
        (pe.IdleInTransactionSessionTimeout("x"), "CONNECTION"),  # 25P03, an InternalError
        (pe.CannotConnectNow("the database system is starting up"), "SERVER_BUSY"),
        (pe.TooManyConnections("sorry, too many clients already"), "SERVER_BUSY"),
        (
            pe.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
            "WRONG_ROLE",
        ),
        (pe.SerializationFailure("could not serialize access"), "TRANSACTION"),
        (pe.DeadlockDetected("deadlock detected"), "TRANSACTION"),
        (pe.InvalidPassword("password authentication failed"), "FATAL"),
        (pe.InvalidAuthorizationSpecification("no pg_hba.conf entry"), "FATAL"),
        (pe.InvalidCatalogName('database "nope" does not exist'), "FATAL"),
        (pe.UniqueViolation("duplicate key"), "STATEMENT"),
        (pe.SyntaxError("syntax error at or near"), "STATEMENT"),
        (pe.UndefinedTable("relation does not exist"), "STATEMENT"),
        (pe.QueryCanceled("canceling statement due to statement timeout"), "STATEMENT"),
        (pe.DivisionByZero("division by zero"), "STATEMENT"),
    ],
)
def test_sqlstate_table(exc: BaseException, failure: str) -> None:
    """Errors carrying a SQLSTATE are classified by it."""
    assert classify(exc) is Failure[failure]


def test_25p03_is_an_internal_error_in_psycopg() -> None:
    """psycopg maps 25P03 to InternalError, not OperationalError: classify still sees it."""
    assert not issubclass(pe.IdleInTransactionSessionTimeout, psycopg.OperationalError)
    assert issubclass(pe.IdleInTransactionSessionTimeout, psycopg.InternalError)


@pytest.mark.parametrize(
    ("text", "failure"),
    [
        ('connection failed: FATAL:  password authentication failed for user "app"', "FATAL"),
        ('connection failed: FATAL:  database "nope" does not exist', "FATAL"),
        ('connection failed: FATAL:  role "nobody" does not exist', "FATAL"),
        ("connection failed: server does not support SSL, but SSL was required", "FATAL"),
        ("connection failed: SSL error: certificate verify failed", "FATAL"),
        ('connection is bad: invalid sslmode value: "bogus"', "FATAL"),
        ('connection is bad: invalid integer value "abc" for connection option "port"', "FATAL"),
        ("connection failed: FATAL:  sorry, too many clients already", "SERVER_BUSY"),
        ("connection failed: FATAL:  the database system is starting up", "SERVER_BUSY"),
        ("connection failed: FATAL:  the database system is shutting down", "SERVER_BUSY"),
        ("connection failed: FATAL:  the database system is in recovery mode", "SERVER_BUSY"),
        ("connection failed: session is read-only", "WRONG_ROLE"),
        ("connection failed: server is in hot standby mode", "WRONG_ROLE"),
    ],
)
def test_connect_texts(text: str, failure: str) -> None:
    """Connection-phase errors (no SQLSTATE in psycopg) are classified by libpq's text."""
    assert classify(OE(text)) is Failure[failure]


def test_malformed_dsn_is_fatal() -> None:
    """A malformed DSN (psycopg's ProgrammingError) is never retried."""
    with pytest.raises(psycopg.ProgrammingError) as info:
        psycopg.conninfo.conninfo_to_dict("host='unterminated")
    assert classify(info.value) is Failure.FATAL


def test_own_errors() -> None:
    """The layer's own errors classify consistently."""
    assert classify(ConnectionLost("x")) is Failure.CONNECTION
    assert classify(DatabaseUnavailable("x")) is Failure.CONNECTION
    assert classify(CommitUnknown("x", xid=1)) is Failure.FATAL
    assert classify(PoolClosed("x")) is Failure.FATAL
    assert classify(PoolTimeout("x")) is Failure.SERVER_BUSY


def test_non_database_errors() -> None:
    """OS-level errors mean the connection; SSL config errors are fatal; the rest is not ours."""
    assert classify(ConnectionResetError()) is Failure.CONNECTION
    assert classify(TimeoutError()) is Failure.CONNECTION
    assert classify(ssl.SSLCertVerificationError()) is Failure.FATAL
    assert classify(ValueError("app bug")) is Failure.STATEMENT
    assert classify(psycopg.InterfaceError("the connection is closed")) is Failure.CONNECTION


def test_errors_are_operational_errors() -> None:
    """Every public error is a psycopg.OperationalError shown as aiopg_resilient.X."""
    for cls in (ConnectionLost, CommitUnknown, DatabaseUnavailable, PoolTimeout, PoolClosed):
        assert issubclass(cls, psycopg.OperationalError)
        assert cls.__module__ == "aiopg_resilient"
    e = DatabaseUnavailable("down", attempts=3, last_error=OE("refused"))
    assert e.attempts == 3
    assert isinstance(e.last_error, OE)
    assert CommitUnknown("?", xid=42).xid == 42


def test_retryable() -> None:
    """Only connection, busy and wrong-role failures are retried by the layer itself."""
    assert {f for f in Failure if f.retryable} == {
        Failure.CONNECTION,
        Failure.SERVER_BUSY,
        Failure.WRONG_ROLE,
    }
