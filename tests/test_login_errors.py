"""Login errors are classified by their SQLSTATE, whatever language the server speaks.

libpq gives no SQLSTATE for a failed login, only the server's text in its
``lc_messages``; the layer reads the code from the handshake (see ``_login``). These
tests run a server that speaks German and check that a wrong password or database is a
configuration error (at once, typed), and "the database system is shutting down" is a
busy server the pool waits out.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import time
from collections.abc import Iterator

import anyio
import psycopg
import psycopg.errors
import pytest

from aiopg_resilient import Failure, ResilientPool, classify
from aiopg_resilient._driver import DriverConnection
from aiopg_resilient._login import login_error
from aiopg_resilient.testing import PostgresServer

LOCALE = "de_DE.UTF-8"


def _have_locale() -> bool:
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    names = {line.strip().lower().replace("utf-8", "utf8") for line in out.stdout.splitlines()}
    return "de_de.utf8" in names


def test_login_error_reads_the_code_in_any_language() -> None:
    """The verbose handshake message gives the code; the text keeps libpq's form."""
    exc = login_error(
        'connection failed: connection to server at "h", port 5 failed: '
        "FATAL:  28P01: Passwort-Authentifizierung für Benutzer »x« fehlgeschlagen\n"
        "LOCATION:  auth_failed, auth.c:323\n"
    )
    assert isinstance(exc, psycopg.errors.InvalidPassword)
    assert exc.sqlstate == "28P01"
    assert str(exc) == (
        'connection failed: connection to server at "h", port 5 failed: '
        "FATAL:  Passwort-Authentifizierung für Benutzer »x« fehlgeschlagen"
    )
    busy = login_error("connection failed: ВАЖНО:  57P03: система баз данных запускается")
    assert classify(busy) is Failure.SERVER_BUSY
    # A database that does not exist: still an OperationalError, as psycopg raises it.
    missing = login_error("connection failed: FATAL:  3D000: la base n'existe pas")
    assert isinstance(missing, psycopg.OperationalError)
    assert missing.sqlstate == "3D000"
    assert classify(missing) is Failure.FATAL
    # Any other refusal at login is a configuration error too (no CONNECT privilege).
    denied = login_error("connection failed: FATAL:  42501: permission denied for database")
    assert classify(denied) is Failure.FATAL
    # A name quoted in the message cannot pass for the code; the text is left alone.
    tricky = login_error(
        'connection to server at "h", port 5 failed: FATAL:  3D000: database '
        '"x: y:  57P03: z" does not exist'
    )
    assert tricky.sqlstate == "3D000"
    assert '"x: y:  57P03: z"' in str(tricky)
    # libpq's LOCATION line goes, in whatever language the client speaks.
    french = login_error(
        "connection failed: FATAL:  28P01: password authentication failed\n"
        "EMPLACEMENT : auth_failed, auth.c : 334\n"
    )
    assert str(french) == "connection failed: FATAL:  password authentication failed"
    # They survive pickling (Celery, multiprocessing) and copying, code and text.
    for exc in (missing, denied, busy):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc)
        assert again.sqlstate == exc.sqlstate
        assert str(again) == str(exc)
        assert copy.copy(exc).sqlstate == exc.sqlstate
    plain = login_error("connection failed: Connection refused")
    assert type(plain) is psycopg.OperationalError
    assert plain.sqlstate is None


@pytest.fixture(scope="module")
def pg_de() -> Iterator[PostgresServer]:
    if not _have_locale():
        pytest.skip(f"the {LOCALE} locale is not generated here (.ci/run runs localedef)")
    server = PostgresServer(settings={"lc_messages": LOCALE})
    server.open_sync()
    try:
        try:
            psycopg.connect(server.conninfo(password="wrong")).close()
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                pytest.skip("this PostgreSQL has no German translations (postgres-*.mo)")
        yield server
    finally:
        server.close_sync()


async def test_wrong_password_in_german_is_a_configuration_error(pg_de: PostgresServer) -> None:
    pool = ResilientPool(pg_de.conninfo(password="wrong"), name="de_password")
    started = time.monotonic()
    with pytest.raises(psycopg.errors.InvalidPassword) as caught:
        await pool.open()
    assert time.monotonic() - started < 2.0
    assert "password authentication failed" not in str(caught.value)  # German, really
    assert "Passwort" in str(caught.value)
    assert classify(caught.value) is Failure.FATAL
    assert pool.stats.connect_failures == 1


async def test_unknown_database_in_german_is_a_configuration_error(
    pg_de: PostgresServer,
) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        await DriverConnection.connect(pg_de.conninfo(dbname="nosuch"))
    assert caught.value.sqlstate == "3D000"
    assert "does not exist" not in str(caught.value)
    assert classify(caught.value) is Failure.FATAL


async def test_a_revoked_connect_privilege_fails_open_at_once(pg_de: PostgresServer) -> None:
    """42501 at login (REVOKE CONNECT): a configuration error, not a busy server."""
    await pg_de.execute("CREATE ROLE nocon LOGIN PASSWORD 'pw'")
    await pg_de.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
    try:
        pool = ResilientPool(pg_de.conninfo(user="nocon", password="pw"), name="de_nocon")
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as caught:
            await pool.open()
        assert time.monotonic() - started < 2.0
        assert caught.value.sqlstate == "42501"
        assert classify(caught.value) is Failure.FATAL
        assert pool.stats.connect_failures == 1
    finally:
        await pg_de.execute("GRANT CONNECT ON DATABASE postgres TO PUBLIC")
        await pg_de.execute("DROP ROLE nocon")


async def test_shutting_down_in_german_is_waited_out(pg_de: PostgresServer) -> None:
    """A smart shutdown held open by a session: new logins get 57P03 in German. That is
    a busy server, not a configuration error: open() does not raise, and the pool
    connects once the server is back."""
    holder = await psycopg.AsyncConnection.connect(pg_de.dsn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: anyio.to_thread.run_sync(lambda: pg_de.stop_sync("smart", timeout=20))
        )
        with anyio.fail_after(10):
            while True:
                try:
                    conn = await DriverConnection.connect(pg_de.dsn)
                except psycopg.OperationalError as exc:
                    busy = exc
                    break
                await conn.close()
                await anyio.sleep(0.02)
        assert isinstance(busy, psycopg.errors.CannotConnectNow), busy
        assert "shutting down" not in str(busy)
        assert "herunter" in str(busy)
        assert classify(busy) is Failure.SERVER_BUSY
        pool = ResilientPool(pg_de.dsn, name="de_busy", min_size=1, max_size=1)
        await pool.open()  # a busy server is not a configuration error
        await holder.close()  # the smart shutdown completes
    await pg_de.start()
    try:
        with anyio.fail_after(10):
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
