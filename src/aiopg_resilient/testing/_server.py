"""A throwaway PostgreSQL server with TLS, for tests (ours and our users').

`PostgresServer` runs a real server that tests can break on purpose: stop it, restart it,
terminate its backends, replace its cluster, fail over to a standby (`StandbyServer`). Three
backends can provide it:

* ``local``: ``initdb`` + ``postgres`` from the server binaries installed on this machine, run
  in the foreground as a child process in a private temporary directory (as the ``postgres``
  OS user when running as root). Server binaries are looked up in the directory named by
  ``AIOPG_RESILIENT_PG_BINDIR`` if that variable is set (and nowhere else), otherwise next to
  ``postgres`` on ``PATH``, in ``pg_config --bindir``, then in the usual package locations
  (``/usr/lib/postgresql/<N>/bin``, ``/usr/pgsql-<N>/bin``, Homebrew), newest version first.
* ``env``: an existing server named by the ``AIOPG_RESILIENT_TEST_DSN`` environment variable.
  Queries work; controlling the server (start, stop, restart) does not.
* ``docker``: ``postgres:15`` in a container through testcontainers, when Docker works.

``backend="auto"`` picks ``env`` when ``AIOPG_RESILIENT_TEST_DSN`` is set, else ``local`` when
server binaries are found, else ``docker`` when usable, else raises `ServerUnavailable`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._admin import _query, _terminate_backends
from ._backends import _MODES, StopMode, _Backend, _no_control
from ._details import _ServerDetails
from ._discovery import BackendName, _check_arguments, choose_backend
from ._errors import ServerControlUnavailable, ServerUnavailable
from ._watchdog import _forget, _remember

if TYPE_CHECKING:
    from psycopg.sql import SQL, Composed

    from ._replica import StandbyServer

__all__ = ["PostgresServer", "ServerControlUnavailable", "ServerUnavailable"]

logger = logging.getLogger("aiopg_resilient.testing")

_STOP_TIMEOUT = 30.0


# --- public class -----------------------------------------------------------------------------


class PostgresServer(_ServerDetails):
    """A throwaway PostgreSQL server with ``ssl=on``, for tests.

    Use it as a context manager, sync or async; the server starts on entry and is stopped and
    deleted on exit::

        with PostgresServer() as pg:                  # e.g. in a session-scoped fixture
            psycopg.connect(pg.dsn)                   # verify-full TLS, password auth

        async with PostgresServer(settings={"idle_session_timeout": "1s"}) as pg:
            await pg.restart("fast")                  # every client gets AdminShutdown
            await pg.terminate_backends(application_name="worker")
            await pg.recreate()                       # a new cluster behind the same dsn
            async with await pg.start_standby() as standby:
                await standby.promote()

    The async methods run their blocking work in a worker thread and never block the event
    loop (cancelling one waits for the step in progress to finish); each has a ``*_sync`` twin
    for code outside an event loop. Stopping a stopped server and starting a running one do
    nothing. Closing, at interpreter exit at the latest, stops the server and deletes its
    files; if the process is killed instead, a watchdog process does it.

    Args:
        ssl: Turn TLS on, with a CA and a server certificate (for ``localhost``,
            ``127.0.0.1`` and ``::1``) made for this run. `dsn` then uses
            ``sslmode=verify-full``; with ``ssl=False`` it uses ``sslmode=disable``.
        port: TCP port on 127.0.0.1; None picks a free one. Restarts keep the port.
        settings: Extra ``postgresql.conf`` settings, applied after ours.
        backend: ``"auto"``, ``"local"``, ``"env"`` or ``"docker"`` (see the module doc).
    """

    def __init__(
        self,
        *,
        ssl: bool = True,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        backend: BackendName = "auto",
    ) -> None:
        self._settings = _check_arguments(backend, port, settings)
        super().__init__(ssl=ssl, backend=backend)
        self._port = port
        self._closed = False
        self._lock = threading.RLock()

    # -- lifecycle --

    def open_sync(self) -> None:
        """Start the server (or attach to the ``env`` one); does nothing if already open."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this PostgresServer is closed; create a new one")
            if self._backend is not None:
                return
            backend = self._make_backend()
            _remember(backend)
            try:
                backend.open()
            except BaseException:
                _forget(backend)
                backend.close()
                raise
            self._backend = backend

    async def open(self) -> None:
        """Async `open_sync`."""
        await anyio.to_thread.run_sync(self.open_sync)

    def _make_backend(self) -> _Backend:
        return choose_backend(
            self._requested_backend, ssl=self._ssl, port=self._port, settings=self._settings
        )

    def close_sync(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and delete its files."""
        with self._lock:
            self._closed = True
            backend, self._backend = self._backend, None
            if backend is not None:
                _forget(backend)
                backend.close()

    async def close(self) -> None:
        """Async `close_sync`; not interrupted by cancellation."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close_sync)

    def __enter__(self) -> PostgresServer:
        self.open_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_sync()

    async def __aenter__(self) -> PostgresServer:
        # No await once open: `async with await pg.start_standby()` must not be cancelled
        # between the two, which would leave the standby open with nobody to close it.
        if self._backend is None:
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- faults --

    def start_sync(self) -> None:
        """Start the server if it is not running (opening it first if need be); wait until ready.

        Raises:
            ServerControlUnavailable: on the ``env`` backend.
        """
        with self._lock:
            if self._backend is None:
                self.open_sync()
            self._open_backend().start()

    async def start(self) -> None:
        """Async `start_sync`."""
        await anyio.to_thread.run_sync(self.start_sync)

    def stop_sync(self, mode: StopMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server as ``pg_ctl stop -m mode`` would, and wait until it has exited.

        ``smart`` waits for clients to disconnect, ``fast`` terminates them (they get
        ``AdminShutdown``), ``immediate`` quits without a clean shutdown (crash recovery on the
        next start). If the server is still up after ``timeout`` seconds, the next mode is
        tried, and finally SIGKILL. Files and port are kept for `start_sync`.

        Raises:
            ServerControlUnavailable: on the ``env`` backend.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be 'smart', 'fast' or 'immediate', not {mode!r}")
        with self._lock:
            if self._backend is None:
                if self._requested_backend == "env":
                    raise _no_control("stopping the server")
                return
            self._backend.stop(mode, timeout)
            logger.info("PostgreSQL on port %d stopped (%s)", self._backend.port, mode)

    async def stop(self, mode: StopMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Async `stop_sync`."""
        await anyio.to_thread.run_sync(lambda: self.stop_sync(mode, timeout=timeout))

    def restart_sync(self, mode: StopMode = "fast") -> None:
        """Stop the server in ``mode``, then start it again on the same port; wait until ready.

        Raises:
            ServerControlUnavailable: on the ``env`` backend.
        """
        with self._lock:
            self._open_backend()
            self.stop_sync(mode)
            self.start_sync()

    async def restart(self, mode: StopMode = "fast") -> None:
        """Async `restart_sync`."""
        await anyio.to_thread.run_sync(lambda: self.restart_sync(mode))

    def recreate_sync(self) -> None:
        """Replace the cluster by a fresh one behind the same address; wait until ready.

        Stops the server (immediate), deletes its data directory, runs initdb again (same
        superuser and password, same certificate, settings and port) and starts it: `dsn`
        still connects, but to a new cluster (another ``system_identifier``, no tables,
        transaction ids and timeline 1 again).

        Raises:
            ServerControlUnavailable: on the ``env`` and ``docker`` backends, and on a standby.
        """
        with self._lock:
            self._open_backend().recreate()

    async def recreate(self) -> None:
        """Async `recreate_sync`."""
        await anyio.to_thread.run_sync(self.recreate_sync)

    def start_standby_sync(self, *, synchronous: bool = False) -> StandbyServer:
        """Start a hot standby of this (running) server and return it once it streams.

        ``pg_basebackup -R`` through a replication slot, then a server on its own free port
        with the same TLS certificate, superuser and password: ``standby.dsn`` is `dsn` with
        another port (and its own copy of the CA file). With ``synchronous=True`` the primary
        waits for it at every commit (see `StandbyServer.set_synchronous_sync`). Close it
        (``with`` / ``async with``) to stop it, delete its files and leave this server as it
        was (no synchronous mode, no slot).

        Raises:
            ServerControlUnavailable: on the ``env`` and ``docker`` backends.
        """
        from ._replica import StandbyServer

        standby = StandbyServer(self, synchronous=synchronous)
        standby.open_sync()
        return standby

    async def start_standby(self, *, synchronous: bool = False) -> StandbyServer:
        """Async `start_standby_sync`: ``async with await pg.start_standby() as standby:``."""
        return await anyio.to_thread.run_sync(
            lambda: self.start_standby_sync(synchronous=synchronous)
        )

    def demote_sync(self, new_primary: PostgresServer, *, timeout: float = 30.0) -> None:
        """Turn this server into a hot standby streaming from ``new_primary`` (a switchover).

        Stops it (fast: clients get ``AdminShutdown``), writes ``standby.signal`` and a
        ``primary_conninfo`` for ``new_primary`` (following its latest timeline, through a
        new slot there), starts it and waits until it streams. ``pg_rewind`` runs first if its
        WAL went past the point where ``new_primary``'s timeline forked off (that needs
        ``REWIND_SETTINGS``). For a whole switchover (stop, promote, demote), see
        ``aiopg_resilient.testing._switchover.switchover``.

        Raises:
            ServerControlUnavailable: on any backend but ``local``.
        """
        from ._switchover import _demote_server

        _demote_server(self, new_primary, timeout=timeout)

    async def demote(self, new_primary: PostgresServer, *, timeout: float = 30.0) -> None:
        """Async `demote_sync`."""
        await anyio.to_thread.run_sync(lambda: self.demote_sync(new_primary, timeout=timeout))

    def terminate_backends_sync(self, application_name: str | None = None) -> int:
        """``pg_terminate_backend`` every client backend but our own; return how many died.

        With ``application_name``, only backends with that application name are terminated.
        Waits (up to 5 s each, on PostgreSQL 14 and later) until they have exited.
        """
        return _terminate_backends(self._open_backend().admin_conninfo(), application_name)

    async def terminate_backends(self, application_name: str | None = None) -> int:
        """Async `terminate_backends_sync`."""
        return await anyio.to_thread.run_sync(
            lambda: self.terminate_backends_sync(application_name)
        )

    def execute_sync(
        self,
        sql: str | SQL | Composed,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement as superuser, in autocommit; return its rows (``[]`` if none)."""
        return _query(self._open_backend().admin_conninfo(), sql, params)

    async def execute(
        self,
        sql: str | SQL | Composed,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Async `execute_sync`: an admin helper for tests (create tables, read pg_stat_*)."""
        return await anyio.to_thread.run_sync(lambda: self.execute_sync(sql, params))

    def __repr__(self) -> str:
        backend = self._backend
        if backend is None:
            state = "closed" if self._closed else "not open"
            return f"<{type(self).__name__} backend={self._requested_backend!r} {state}>"
        state = "running" if backend.running else "stopped"
        return (
            f"<{type(self).__name__} backend={backend.name!r} host={backend.host!r} "
            f"port={backend.port} {state}>"
        )


PostgresServer.__module__ = "aiopg_resilient.testing"
