"""A throwaway PgBouncer in front of a `PostgresServer`, for tests of pooled setups.

`PgBouncer` starts the ``pgbouncer`` installed on this machine (``apt-get install pgbouncer``)
on a free port of 127.0.0.1, in front of a running `PostgresServer`, and lets a test break it:
pause it, make it drop its server connections, change its timeouts, restart it::

    async with PgBouncer(pg, pool_mode="transaction") as bouncer:
        conn = await psycopg.AsyncConnection.connect(bouncer.dsn, prepare_threshold=None)
        await bouncer.admin("PAUSE")                 # queries wait ...
        await bouncer.admin("RESUME")                # ... and go on
        await bouncer.set("idle_transaction_timeout", "1")
        await bouncer.restart()                      # every client is cut, same port

The process side (files, signals, the watchdog) is in `._pgbouncer_proc`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.to_thread
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._backends import StopMode
from ._errors import ServerControlUnavailable
from ._pgbouncer_proc import _BouncerProcess, _check_setting, _find_pgbouncer
from ._server import PostgresServer
from ._watchdog import _forget, _remember

__all__ = ["PgBouncer", "PoolMode"]

logger = logging.getLogger("aiopg_resilient.testing")

PoolMode = Literal["session", "transaction", "statement"]

_STOP_TIMEOUT = 10.0


class PgBouncer:
    """A PgBouncer (1.18 or later) in front of a running `PostgresServer`, for tests.

    Use it as a context manager, sync or async: PgBouncer starts on entry and is stopped (and
    its files deleted) on exit, at interpreter exit at the latest, or by a watchdog process if
    the test process is killed. Each async method runs its blocking work in a worker thread;
    each has a ``*_sync`` twin.

    Clients connect to `dsn`: plain TCP (``sslmode=disable``) to 127.0.0.1:`port`, as the
    server's superuser with its password (SCRAM), to the server's database (any other database
    name is passed through too). PgBouncer logs in to the server over TCP with TLS
    (``server_tls_sslmode=require``) with the same user and password. The superuser is an
    ``admin_users`` of the console (database ``pgbouncer``), see `admin_sync`.

    Our defaults: ``default_pool_size=20``, ``max_client_conn=200``,
    ``ignore_startup_parameters=extra_float_digits,options``, ``server_connect_timeout=5``;
    and, unlike PgBouncer's own defaults, ``server_login_retry=1`` (not 15 s: after a failed
    login to the server, new clients get "server login has been failing" for that long) and
    ``query_wait_timeout=10`` (not 120 s: how long a query waits for a server connection, e.g.
    while the server is down, before its client is disconnected).

    Note: PgBouncer before 1.21 does not track prepared statements, so psycopg's automatic
    prepared statements (``prepare_threshold``, 5 by default) fail in transaction mode once a
    query lands on another server connection; connect with ``prepare_threshold=None`` there.

    What clients see (PgBouncer 1.18): PgBouncer's own errors are FATAL ``08P01``
    (`psycopg.errors.ProtocolViolation`) with the message ``client_idle_timeout``, ``idle
    transaction timeout``, ``query_wait_timeout``, ``database removed`` (console ``KILL``) or
    ``server login has been failing, try again later (server_login_retry)``. Stopping or
    restarting PgBouncer closes client sockets without a message (``OperationalError: server
    closed the connection unexpectedly``). A server's own errors pass through (a terminated
    backend: ``57P01`` AdminShutdown); in transaction mode an idle client never notices a
    server restart, PgBouncer connects again for its next transaction.

    Args:
        server: The `PostgresServer` to pool connections to (open, and running on start).
        pool_mode: ``"transaction"`` (the default), ``"session"`` or ``"statement"``.
        settings: Extra ``[pgbouncer]`` settings of ``pgbouncer.ini``, applied after ours
            (for example ``{"query_wait_timeout": "2", "server_lifetime": "10"}``).

    Raises:
        ServerControlUnavailable: from `open_sync` if PgBouncer is not installed.
    """

    def __init__(
        self,
        server: PostgresServer,
        *,
        pool_mode: PoolMode = "transaction",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(
                f"pool_mode must be 'session', 'transaction' or 'statement', not {pool_mode!r}"
            )
        for name, value in (settings or {}).items():
            _check_setting(name, value)
        self._server = server
        self._pool_mode: PoolMode = pool_mode
        self._settings = dict(settings or {})
        self._process: _BouncerProcess | None = None
        self._closed = False
        self._lock = threading.RLock()

    @staticmethod
    def available() -> bool:
        """Whether a ``pgbouncer`` executable is installed (`open_sync` would find it)."""
        try:
            _find_pgbouncer()
        except ServerControlUnavailable:
            return False
        return True

    # -- lifecycle --

    def open_sync(self) -> None:
        """Write the configuration and start PgBouncer; wait until its console answers.

        Does nothing if already open.

        Raises:
            ServerControlUnavailable: if PgBouncer is not installed.
            RuntimeError: if it does not start (the message ends with its log).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this PgBouncer is closed; create a new one")
            if self._process is not None:
                return
            process = _BouncerProcess(
                self._server._open_backend(), pool_mode=self._pool_mode, settings=self._settings
            )
            _remember(process)
            try:
                process.open()
            except BaseException:
                _forget(process)
                process.close()
                raise
            self._process = process

    async def open(self) -> None:
        """Async `open_sync`."""
        await anyio.to_thread.run_sync(self.open_sync)

    def close_sync(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL) and delete its files."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
            if process is not None:
                _forget(process)
                process.close()

    async def close(self) -> None:
        """Async `close_sync`; not interrupted by cancellation."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close_sync)

    def __enter__(self) -> PgBouncer:
        self.open_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_sync()

    async def __aenter__(self) -> PgBouncer:
        if self._process is None:
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open_process(self) -> _BouncerProcess:
        process = self._process
        if process is None:
            raise RuntimeError(
                "this PgBouncer is not open: use `with PgBouncer(pg) as bouncer:` or `async with`"
            )
        return process

    # -- faults --

    def start_sync(self) -> None:
        """Start PgBouncer again (same port, same configuration) if it is not running."""
        with self._lock:
            self._open_process().start()

    async def start(self) -> None:
        """Async `start_sync`."""
        await anyio.to_thread.run_sync(self.start_sync)

    def stop_sync(self, mode: StopMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop PgBouncer and wait until it has exited; `start_sync` brings it back.

        ``fast`` (SIGTERM) closes every client and server connection at once; ``smart``
        (SIGINT) is PgBouncer's safe shutdown: PAUSE (wait for every server connection to be
        released, which in session mode means for every client to disconnect), then
        shutdown; ``immediate`` is SIGKILL. After ``timeout`` seconds the next mode is tried.
        """
        with self._lock:
            self._open_process().stop(mode, timeout)
            logger.info("PgBouncer on port %d stopped (%s)", self.port, mode)

    async def stop(self, mode: StopMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Async `stop_sync`."""
        await anyio.to_thread.run_sync(lambda: self.stop_sync(mode, timeout=timeout))

    def restart_sync(self, mode: StopMode = "fast") -> None:
        """`stop_sync` then `start_sync`: clients are cut, and it listens on the same port."""
        with self._lock:
            self.stop_sync(mode)
            self.start_sync()

    async def restart(self, mode: StopMode = "fast") -> None:
        """Async `restart_sync`."""
        await anyio.to_thread.run_sync(lambda: self.restart_sync(mode))

    def admin_sync(self, command: str) -> list[tuple[Any, ...]]:
        """Run one command on the admin console; return its rows (``[]`` if none).

        For example ``SHOW POOLS``, ``SHOW CLIENTS``, ``PAUSE``, ``RESUME``, ``RECONNECT``,
        ``KILL postgres``, ``SET server_lifetime = 1``. ``PAUSE`` returns once every server
        connection has been released (in transaction mode: no transaction is open).
        """
        return self._open_process().admin(command)

    async def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Async `admin_sync`."""
        return await anyio.to_thread.run_sync(lambda: self.admin_sync(command))

    def set_sync(self, name: str, value: str) -> None:
        """Change a setting on the running PgBouncer (console ``SET name = 'value'``).

        It is also written to the configuration file, so it survives `restart_sync`.
        Example: ``set_sync("client_idle_timeout", "1")``.

        Raises:
            psycopg.errors.ProtocolViolation: ``SET failed`` (unknown setting, bad value).
        """
        _check_setting(name, value)
        quoted = "'" + value.replace("'", "''") + "'"
        with self._lock:
            process = self._open_process()
            if process.running:
                process.admin(f"SET {name} = {quoted}")
            process.settings[name] = value
            process.write_config()

    async def set(self, name: str, value: str) -> None:
        """Async `set_sync`."""
        await anyio.to_thread.run_sync(lambda: self.set_sync(name, value))

    # -- details --

    @property
    def server(self) -> PostgresServer:
        """The server PgBouncer pools connections to."""
        return self._server

    @property
    def pool_mode(self) -> PoolMode:
        """The ``pool_mode`` it was started with."""
        return self._pool_mode

    @property
    def running(self) -> bool:
        """True while the PgBouncer process is alive."""
        return self._process is not None and self._process.running

    @property
    def pid(self) -> int | None:
        """The process id of the running PgBouncer, None when stopped."""
        return self._open_process().pid

    @property
    def host(self) -> str:
        """``127.0.0.1``."""
        return self._open_process().host

    @property
    def port(self) -> int:
        """TCP port PgBouncer listens on; the same across restarts."""
        return self._open_process().port

    @property
    def dsn(self) -> str:
        """libpq DSN through PgBouncer: superuser, password, server's database, no TLS."""
        return self._open_process().dsn

    def conninfo(self, **overrides: str | int | None) -> str:
        """`dsn` with keys replaced or added; a None value removes the key."""
        params = conninfo_to_dict(self.dsn)
        for key, value in overrides.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = value
        return make_conninfo("", **params)

    @property
    def admin_dsn(self) -> str:
        """DSN of the admin console (database ``pgbouncer``); use the simple query protocol."""
        return self._open_process().admin_conninfo()

    @property
    def log_path(self) -> Path:
        """PgBouncer's log file (its stderr), for diagnosing test failures."""
        path = self._open_process().log_path
        assert path is not None
        return path

    @property
    def pid_path(self) -> Path:
        """PgBouncer's pid file (present while it runs)."""
        path = self._open_process().pid_path
        assert path is not None
        return path

    def __repr__(self) -> str:
        process = self._process
        if process is None:
            state = "closed" if self._closed else "not open"
            return f"<PgBouncer pool_mode={self._pool_mode!r} {state}>"
        state = "running" if process.running else "stopped"
        return f"<PgBouncer pool_mode={self._pool_mode!r} port={process.port} {state}>"


PgBouncer.__module__ = "aiopg_resilient.testing"
