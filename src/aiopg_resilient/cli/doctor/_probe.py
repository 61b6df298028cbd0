"""Probing one host: reach it, ask for TLS, log in with each sslmode, read the server.

Every step is bounded by the doctor's ``--timeout``; at most two connections to the host
are open at once (one when no pooler is in the path), and logins run one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import threading
import time
from dataclasses import replace
from typing import Any

import anyio
import anyio.to_thread
import psycopg

from ..._driver import DriverConnection
from ._model import (
    SSLMODES,
    HostReport,
    LadderStep,
    PoolerFacts,
    ServerFacts,
    Setting,
    SocketOptions,
    Target,
    TlsProbe,
)
from ._net import tcp_connect, tls_probe, trust_from
from ._target import Dsn

__all__ = ["APPLICATION_NAME", "SETTINGS", "connect", "probe_host", "short_error"]

logger = logging.getLogger("aiopg_resilient.doctor")

APPLICATION_NAME = "aiopg-resilient doctor"
SETTINGS = (
    "ssl",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
    "client_connection_check_interval",
    "statement_timeout",
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
)
_FACTS = (
    "SELECT current_setting('server_version'), pg_is_in_recovery(),"
    " current_setting('transaction_read_only'), current_setting('is_superuser'),"
    " pg_backend_pid(),"
    " (SELECT count(*) FROM pg_stat_activity"
    # Other roles' backends show a NULL backend_type to a non-superuser; a database tells
    # them from the auxiliary processes.
    "  WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND datid IS NOT NULL))"
    "  AND pid <> pg_backend_pid()"
    "  AND application_name IS DISTINCT FROM %s)"
)
_SETTINGS_QUERY = "SELECT name, setting, unit, source FROM pg_settings WHERE name = ANY(%s)"
# "connection failed: connection to server at "h" (1.2.3.4), port 5432 failed: " says
# again which host it was: the doctor says that itself.
_PREFIX = re.compile(
    r"^(connection (failed|is bad): )?(connection to server (at|on) .*? failed: )+"
)
_HOPELESS = ("28P01", "3D000", "53300", "57P03")
# Most secure first: the connection the server facts are read from when the DSN's own
# sslmode cannot log in.
_PREFERENCE = ("verify-full", "verify-ca", "require", "prefer", "allow", "disable")


def short_error(exc: BaseException) -> str:
    """libpq's message for *exc* on one line, without the "connection to server at"
    preamble; a timeout says so."""
    if isinstance(exc, TimeoutError):
        return "no answer in time (timed out)"
    text = " ".join(str(exc).split())
    return _PREFIX.sub("", text) or type(exc).__name__


def connect_timeout(dsn: Dsn, timeout: float) -> str:
    """libpq's connect_timeout for the doctor's logins: the DSN's, at most *timeout*
    (libpq's minimum is 2 s)."""
    own = max(2, math.ceil(timeout))
    given = dsn.get("connect_timeout")
    if given and given.isdigit() and 0 < int(given) < own:
        return given
    return str(own)


async def connect(conninfo: str, timeout: float) -> DriverConnection:
    """A connection in autocommit, no prepared statements (a pooler may be in the path),
    given up after *timeout* seconds; an attempt given up closes its socket at once
    (`DriverConnection.connect`)."""
    with anyio.fail_after(timeout):
        conn = await DriverConnection.connect(conninfo, autocommit=True, prepare_threshold=None)
    assert isinstance(conn, DriverConnection)
    return conn


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await conn.close()


async def _login(
    conninfo: str, timeout: float
) -> tuple[DriverConnection | None, float, BaseException | None]:
    start = time.perf_counter()
    try:
        conn = await connect(conninfo, timeout)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        logger.debug("login failed: %s", short_error(exc))
        return None, (time.perf_counter() - start) * 1000, exc
    return conn, (time.perf_counter() - start) * 1000, None


async def probe_host(dsn: Dsn, target: Target, timeout: float) -> HostReport:
    """Everything the doctor learns about *target*, one probe after another."""
    report = HostReport(target)
    tls: TlsProbe | None = None
    if target.address is not None:
        report = await _network(dsn, report, target.address, timeout)
        if report.dns_error or report.tcp_error:
            return report
        tls = report.tls
    base = {
        "application_name": APPLICATION_NAME,
        "connect_timeout": connect_timeout(dsn, timeout),
    }
    conn, login_ms, error = await _login(dsn.for_target(target, **base), timeout)
    report = _with(
        report,
        login_ms=login_ms,
        login_error=None if error is None else short_error(error),
        login_sqlstate=getattr(error, "sqlstate", None),
    )
    if conn is not None:  # the server first: the ladder's logins would count as load
        conninfo = dsn.for_target(target, **base)
        report = await _read_server(report, conn, conninfo, dsn.sslmode, timeout)
    silent = tls is not None and tls.offered is None
    hopeless = report.login_sqlstate in _HOPELESS
    if target.is_socket or (silent and conn is None) or hopeless:
        # No TLS there, or nothing answers, or another sslmode would only add failed
        # logins (a wrong password, no such database, a full or starting server).
        ladder: tuple[LadderStep, ...] = ()
    else:
        root_file = trust_from(dsn.get("sslrootcert"))[1] is not None
        ladder = await _ladder(dsn, target, base, root_file, timeout)
    report = _with(report, ladder=ladder)
    if conn is None:  # the DSN's sslmode cannot log in: read the server with the best one
        working = {step.sslmode for step in ladder if step.connected}
        sslmode = next((mode for mode in _PREFERENCE if mode in working), None)
        if sslmode is not None:
            conninfo = dsn.for_target(target, **base, sslmode=sslmode)
            conn, _, _ = await _login(conninfo, timeout)
            if conn is not None:
                report = await _read_server(report, conn, conninfo, sslmode, timeout)
    return report


async def _read_server(
    report: HostReport, conn: DriverConnection, conninfo: str, sslmode: str, timeout: float
) -> HostReport:
    """*report* with what *conn* (logged in with *conninfo*, *sslmode*) learns; closes
    *conn*."""
    try:
        facts = await _facts(conn, sslmode, timeout)
        pooler = None
        if facts.server_pid != facts.login_pid:
            pooler = await _pooler(conn, conninfo, facts, timeout)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        logger.debug("reading the server failed: %s", short_error(exc))
        return _with(report, login_error=report.login_error or short_error(exc))
    finally:
        await _close(conn)
    return _with(report, facts=facts, pooler=pooler)


async def _network(dsn: Dsn, report: HostReport, address: str, timeout: float) -> HostReport:
    """Name lookup, TCP connect (the first of three addresses that answers) and the TLS
    probe of *address*."""
    port = report.target.port
    try:
        with anyio.fail_after(timeout):
            infos = await _getaddrinfo(address, int(port))
    except TimeoutError:
        return _with(report, dns_error=f"no answer from DNS for {address} within {timeout:g} s")
    except OSError as exc:
        return _with(report, dns_error=f"cannot resolve {address}: {exc}")
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    report = _with(report, addresses=addresses)
    failures = []
    for candidate in addresses[:3]:
        try:
            tcp_ms = await anyio.to_thread.run_sync(
                lambda: tcp_connect(candidate, port, timeout)  # noqa: B023 (awaited here)
            )
        except TimeoutError:
            failures.append(f"{candidate}: no answer within {timeout:g} s")
        except OSError as exc:
            failures.append(f"{candidate}: {exc.strerror or exc}")
        else:
            break
    else:
        return _with(report, tcp_error="TCP connect failed: " + "; ".join(failures))
    trust = trust_from(dsn.get("sslrootcert"))
    name = report.target.host or report.target.hostaddr
    tls = await anyio.to_thread.run_sync(lambda: tls_probe(candidate, port, name, trust, timeout))
    return _with(report, tcp_ms=tcp_ms, tls=tls)


async def _getaddrinfo(address: str, port: int) -> list[Any]:
    """``socket.getaddrinfo`` in a daemon thread of its own, abandoned if the caller gives
    up. Review 11: asyncio's and anyio's resolver threads are joined when the program
    ends, so a DNS server that does not answer held the doctor past its --timeout, for as
    long as the resolver's own timeouts (5 s a try, tries times servers: 10 to 30 s)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[list[Any]] = loop.create_future()

    def settle(result: list[Any] | None, error: BaseException | None) -> None:
        if answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result or [])

    def resolve() -> None:
        result, error = None, None
        try:
            result = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        except Exception as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=resolve, name="aiopg-resilient doctor DNS", daemon=True).start()
    return await answer


def _with(report: HostReport, **changes: Any) -> HostReport:
    return replace(report, **changes)


async def _ladder(
    dsn: Dsn, target: Target, base: dict[str, str], root_file: bool, timeout: float
) -> tuple[LadderStep, ...]:
    """One login per sslmode, one at a time. With a root certificate file (*root_file*)
    libpq checks the chain in every mode that encrypts."""
    steps = []
    for mode in SSLMODES:
        conn, ms, error = await _login(dsn.for_target(target, **base, sslmode=mode), timeout)
        if conn is None:
            assert error is not None
            steps.append(LadderStep(mode, False, error=short_error(error), ms=ms))
            continue
        encrypted = bool(conn.pgconn.ssl_in_use)
        await _close(conn)
        verified = ""
        if encrypted and mode == "verify-full":
            verified = "certificate and host name"
        elif encrypted and (mode == "verify-ca" or root_file):
            verified = "certificate"
        steps.append(LadderStep(mode, True, encrypted=encrypted, ms=ms, verified=verified))
    return tuple(steps)


async def _facts(conn: DriverConnection, sslmode: str, timeout: float) -> ServerFacts:
    with anyio.fail_after(timeout):
        cur = await conn.execute(_FACTS, (APPLICATION_NAME,))
        row = await cur.fetchone()
        assert row is not None
        cur = await conn.execute(_SETTINGS_QUERY, (list(SETTINGS),))
        settings = {
            str(name): Setting(str(value), unit, source)
            for name, value, unit, source in await cur.fetchall()
        }
    version, in_recovery, read_only, superuser, pid, others = row
    return ServerFacts(
        version=str(version),
        in_recovery=bool(in_recovery),
        read_only=read_only == "on",
        settings=settings,
        others=int(others),
        superuser=superuser == "on",
        server_pid=int(pid),
        login_pid=conn.info.backend_pid,
        sslmode=sslmode,
        encrypted=bool(conn.pgconn.ssl_in_use),
        socket=socket_options(conn.pgconn.socket),
    )


def socket_options(fd: int) -> SocketOptions | None:
    """The keepalive and user-timeout options of the TCP socket *fd* (None if it is not
    TCP, or the platform hides them)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None

        def tcp(name: str) -> int | None:
            option = getattr(socket, name, None)
            if option is None:
                return None
            try:
                return int(sock.getsockopt(socket.IPPROTO_TCP, option))
            except OSError:
                return None

        try:
            keepalive = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        except OSError:
            return None
        return SocketOptions(
            keepalive=keepalive,
            idle=tcp("TCP_KEEPIDLE"),
            interval=tcp("TCP_KEEPINTVL"),
            count=tcp("TCP_KEEPCNT"),
            user_timeout_ms=tcp("TCP_USER_TIMEOUT"),
        )


async def _pid(conn: DriverConnection) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _pooler(
    conn: DriverConnection, conninfo: str, facts: ServerFacts, timeout: float
) -> PoolerFacts:
    """What kind of pooler: do two clients share a server connection in turn (transaction
    or statement mode), is a two-statement transaction refused (statement mode), and what
    does PgBouncer's ``SHOW CONFIG`` say (when this user may read it)."""
    shared: bool | None = None
    transaction_error = None
    other, _, _ = await _login(conninfo, timeout)
    if other is not None:
        try:
            with anyio.fail_after(timeout):
                first = await _pid(conn)
                shared = first == await _pid(other)
                try:
                    async with other.transaction():
                        await other.execute("SELECT 1")
                        await other.execute("SELECT 1")
                except psycopg.Error as exc:
                    transaction_error = short_error(exc)
        except (psycopg.Error, TimeoutError) as exc:
            logger.debug("pooler mode probe failed: %s", short_error(exc))
        finally:
            await _close(other)
    config, config_error = await _show_config(conninfo, timeout)
    return PoolerFacts(
        server_pid=facts.server_pid,
        login_pid=facts.login_pid,
        shared_backend=shared,
        config=config,
        config_error=config_error,
        transaction_error=transaction_error,
    )


async def _show_config(conninfo: str, timeout: float) -> tuple[dict[str, str] | None, str | None]:
    """PgBouncer's settings from its admin console (database ``pgbouncer``)."""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    params["dbname"] = "pgbouncer"
    try:
        conn = await connect(psycopg.conninfo.make_conninfo("", **params), timeout)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        return None, short_error(exc)
    try:
        with anyio.fail_after(timeout):
            cur = psycopg.AsyncClientCursor(conn)  # the console speaks simple queries only
            await cur.execute("SHOW CONFIG")
            rows = await cur.fetchall()
    except (psycopg.Error, TimeoutError) as exc:
        return None, short_error(exc)
    finally:
        await _close(conn)
    return {str(row[0]): str(row[1]) for row in rows}, None
