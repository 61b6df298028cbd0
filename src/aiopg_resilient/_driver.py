"""The psycopg connection class the layer uses: cancellation never outlives the caller.

On a cancelled query, psycopg's `AsyncConnection.wait` sends a cancel request and then
waits up to 5 s for the server to answer it (10 s in all). Through a half-open peer the
answer never comes, so a caller whose ``asyncio.timeout()`` fired would stay blocked for
seconds past its deadline. The layer closes a connection cancelled mid-query anyway (its
state is unknown), so this class closes it at once and sends the cancel request to the
server in the background, so that the server stops working on the abandoned query.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import psycopg
from psycopg import AsyncConnection, AsyncCursor, AsyncTransaction, sql, waiting
from psycopg.abc import RV, PQGen, PQGenConn
from psycopg.pq import PollingStatus, TransactionStatus
from psycopg.rows import tuple_row

from ._login import start
from ._role import RoleChanged, drifted

__all__ = ["DriverConnection", "Owner", "tuple_cursor"]

logger = logging.getLogger("aiopg_resilient.pool")

_CANCEL_TIMEOUT = 5.0
_background: set[asyncio.Task[None]] = set()
_INTERRUPTS = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


# The login attempts of the `DriverConnection.connect` running in this context.
_ATTEMPTS: contextvars.ContextVar[list[PQGenConn[Any]]] = contextvars.ContextVar(
    "aiopg_resilient_login_attempts"
)


class Owner(Protocol):
    """The layer's block that holds a connection: it decides what commit() means."""

    async def commit(self, conn: DriverConnection) -> None: ...

    async def rollback(self, conn: DriverConnection) -> None: ...

    def ended_by_sql(self) -> None:
        """A statement of the user's (``COMMIT``, ``ROLLBACK``) ended the transaction."""


_SETTINGS = ("isolation_level", "read_only", "deferrable")
# Session settings the server reports to the client when they change (GUC_REPORT): a
# borrower's SET of one of these is seen without a round trip, and undone on release.
_REPORTED = (
    "default_transaction_read_only",
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "search_path",
    "application_name",
    "standard_conforming_strings",
)
_REPORTED_BYTES = tuple(name.encode() for name in _REPORTED)
_RESET_READ_ONLY = "SELECT reset_val FROM pg_settings WHERE name = 'default_transaction_read_only'"


class DriverConnection(AsyncConnection[Any]):
    """An `AsyncConnection` that closes at once when cancelled mid-query, never cancels a
    COMMIT, and lets the layer own the transaction of a block."""

    protect_commit = False
    interrupted = False
    """Closed by the layer because the caller was cancelled mid-query (not a failure)."""
    owner: Owner | None = None
    identity: tuple[str | None, str | None, str | None] | None = None
    """The server incarnation this connection lives in (see `_commit.IDENTITY_QUERY`)."""
    _baseline: tuple[Any, ...] = ()
    _role: tuple[bytes | None, bytes | None] | None = None
    pooled = False
    alternatives = False
    """The conninfo offers other servers (several hosts, any role): a write refused by
    a standby may be re-run on a primary among them."""
    backend_start: str | None = None
    """When the server started this connection's backend (epoch, as text): with the pid,
    it names the backend for good (pids are reused)."""
    """A connection pooler (PgBouncer) is between us and the server: the backend pid
    psycopg knows is not the server's, and server-side prepared statements are off."""

    @classmethod
    def _connect_gen(cls, conninfo: str = "", *, timeout: float = 0.0) -> PQGenConn[Any]:
        gen = cls._login(conninfo, timeout)
        attempts = _ATTEMPTS.get(None)
        if attempts is not None:
            attempts.append(gen)
        return gen

    @classmethod
    def _login(cls, conninfo: str, timeout: float) -> PQGenConn[Any]:
        # Login errors with their SQLSTATE (see _login). psycopg < 3.3 passes *timeout*.
        pgconn = yield from start(conninfo, timeout)
        return cls(pgconn)

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> DriverConnection:
        """psycopg's connect, and a login given up (cancelled, timed out) closes its
        socket at once: psycopg's wait leaves the login generator suspended, its socket
        (often a session the server just logged in) open until the garbage collector
        gets to it."""
        attempts: list[PQGenConn[Any]] = []
        token = _ATTEMPTS.set(attempts)
        try:
            conn = await super().connect(conninfo, **kwargs)
        except BaseException:
            for gen in attempts:
                gen.close()  # _login.start closes the socket (a no-op once it finished)
            raise
        finally:
            _ATTEMPTS.reset(token)
        assert isinstance(conn, DriverConnection)
        return conn

    async def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        # psycopg < 3.3's wait_async() has no timeout parameter.
        extra = {} if timeout is None else {"timeout": timeout}
        before = self.pgconn.transaction_status
        try:
            result = await waiting.wait_async(gen, self.pgconn.socket, interval=interval, **extra)
        except _INTERRUPTS:
            if self.pgconn.transaction_status == TransactionStatus.ACTIVE:
                if not self.protect_commit:
                    _cancel_in_background(self)
                self.interrupted = True
                self.pgconn.finish()
            raise
        if (
            self.owner is not None
            and not self.protect_commit
            and before == TransactionStatus.INTRANS
            and self.pgconn.transaction_status == TransactionStatus.IDLE
        ):
            self.owner.ended_by_sql()
        return result

    # -- the layer owns the transaction -----------------------------------------------

    async def commit(self) -> None:
        if self.owner is None:
            await super().commit()
        else:
            await self.owner.commit(self)

    async def rollback(self) -> None:
        if self.owner is None:
            await super().rollback()
        else:
            await self.owner.rollback(self)

    async def plain_commit(self) -> None:
        """psycopg's own commit(), for the layer."""
        await super().commit()

    async def plain_rollback(self) -> None:
        """psycopg's own rollback(), for the layer."""
        await super().rollback()

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        if (
            self.owner is not None
            and not self.autocommit
            and self.pgconn.transaction_status == TransactionStatus.IDLE
        ):
            # Open the layer's transaction first: the user's block is then a savepoint.
            async with self.lock:
                await self.wait(self._start_query())
        async with super().transaction(savepoint_name, force_rollback) as tx:
            yield tx

    # -- what a borrower changed ------------------------------------------------------

    _reported: tuple[bytes | None, ...] = ()

    _configured: frozenset[int] = frozenset()

    def keep_settings(self, before: tuple[bytes | None, ...] | None = None) -> None:
        """Remember the connection's settings as configured, to restore them later;
        *before*: the reported settings before ``configure`` ran (those it changed are
        put back to its values, the others to the server's default)."""
        self._baseline = self._settings()
        self._reported = self._reported_now()
        self._role = self.role_now()
        if before is None:
            self._configured = frozenset(range(len(_REPORTED)))
        else:
            self._configured = frozenset(
                i
                for i, (then, now) in enumerate(zip(before, self._reported, strict=True))
                if then != now
            )

    def reported_now(self) -> tuple[bytes | None, ...]:
        """The session settings the server reports (see ``_REPORTED``)."""
        return self._reported_now()

    def role_now(self) -> tuple[bytes | None, bytes | None]:
        """The server's role as reported: (in_hot_standby, default_transaction_read_only)."""
        status = self.pgconn.parameter_status
        return status(b"in_hot_standby"), status(b"default_transaction_read_only")

    def role_baseline(self) -> tuple[bytes | None, bytes | None]:
        """The server's role as reported when the connection was made."""
        return self._role or (None, None)

    def role_drift(self) -> str | None:
        """How the server's reported role moved towards read-only since connect, or None
        (no round trip: see `_role`)."""
        return drifted(self._role, self.role_now()) if self._role else None

    def _reported_now(self) -> tuple[bytes | None, ...]:
        status = self.pgconn.parameter_status
        return tuple(status(name) for name in _REPORTED_BYTES)

    def _settings(self) -> tuple[Any, ...]:
        return (
            self.row_factory,
            self.cursor_factory,
            self.prepare_threshold,
            *(getattr(self, name) for name in _SETTINGS),
        )

    async def _server_default_read_only(self) -> bool:
        """Whether the server's own default (not a SET) makes sessions read-only."""
        return await _read_only_default(self)

    async def restore_settings(self) -> None:
        """Undo what a borrower changed on the connection object (idle: no round trip),
        and the reported session settings it changed with SET (one round trip then).
        Raises `RoleChanged` if the server turned read-only: a SET must not undo that."""
        role = self.role_now()
        if role != self._role and self._role:
            drift = drifted(self._role, role)
            if drift is not None and (role[0] == b"on" or await self._server_default_read_only()):
                raise RoleChanged(drift)  # not the borrower's SET: never undo it
            self._role = role
        if self._reported and self._reported_now() != self._reported:
            # What configure() set goes back to its value; anything else to the server's
            # default (RESET), which may have changed meanwhile (a reload): never to a
            # value the server itself has since moved away from.
            cur = tuple_cursor(self)
            for i, (name, value, now) in enumerate(
                zip(_REPORTED, self._reported, self._reported_now(), strict=True)
            ):
                if value == now:
                    continue
                if i in self._configured and value is not None:
                    query = "SELECT set_config(%s, %s, false)"
                    await cur.execute(query, (name, value.decode()), prepare=False)
                else:
                    reset = sql.SQL("RESET {}").format(sql.Identifier(name))
                    await cur.execute(reset, prepare=False)
            self._reported = self._reported_now()
            self._role = self.role_now()
        if not self._baseline or self._settings() == self._baseline:
            return
        row_factory, cursor_factory, prepare_threshold, isolation, read_only, deferrable = (
            self._baseline
        )
        self.row_factory = row_factory
        self.cursor_factory = cursor_factory
        self.prepare_threshold = prepare_threshold
        await self.set_isolation_level(isolation)
        await self.set_read_only(read_only)
        await self.set_deferrable(deferrable)


async def _read_only_default(conn: AsyncConnection[Any]) -> bool:
    cur = tuple_cursor(conn)
    await cur.execute(_RESET_READ_ONLY, prepare=False)
    row = await cur.fetchone()
    return bool(row and row[0] == "on")


def tuple_cursor(conn: AsyncConnection[Any]) -> AsyncCursor[tuple[Any, ...]]:
    """A cursor for the layer's own queries, whatever row or cursor factory the user set."""
    return AsyncCursor(conn, row_factory=tuple_row)


def _cancel_in_background(conn: AsyncConnection[Any]) -> None:
    """Ask the server to cancel *conn*'s query without waiting for the answer."""
    try:
        if psycopg.capabilities.has_cancel_safe():
            cancel_conn = conn.pgconn.cancel_conn()
            cancel_conn.start()
            task = asyncio.ensure_future(_drive(cancel_conn))
        elif psycopg.pq.__impl__ == "python":
            pgcancel = conn.pgconn.get_cancel()
            task = asyncio.ensure_future(asyncio.to_thread(pgcancel.cancel))
        else:
            # libpq < 17 under psycopg's C implementation: PGcancel.cancel() blocks in
            # PQcancel holding the GIL, so even from a thread a frozen peer would freeze
            # the whole process. The connection is closed anyway: no cancel request.
            logger.debug(
                "no cancel request sent: libpq %s has no non-blocking cancel", psycopg.pq.version()
            )
            return
    except Exception as exc:  # best effort: the connection is being closed anyway
        logger.debug("could not send a cancel request: %s", exc)
        return
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _drive(cancel_conn: Any) -> None:
    """Run libpq's non-blocking cancel connection to completion, for at most 5 s."""
    loop = asyncio.get_running_loop()
    try:
        with anyio.move_on_after(_CANCEL_TIMEOUT):
            while True:
                status = cancel_conn.poll()
                if status not in (PollingStatus.READING, PollingStatus.WRITING):
                    return
                ready: asyncio.Future[None] = loop.create_future()
                fd = cancel_conn.socket

                def wake(fut: asyncio.Future[None] = ready) -> None:
                    if not fut.done():
                        fut.set_result(None)

                if status == PollingStatus.READING:
                    loop.add_reader(fd, wake)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(fd)
                else:
                    loop.add_writer(fd, wake)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(fd)
    except (OSError, psycopg.Error) as exc:
        logger.debug("cancel request not delivered: %s", exc)
    finally:
        cancel_conn.finish()
