"""Making one connection: the conninfo (a string, or a callable for rotating
credentials), the resilience defaults, ``configure``, and what a failure means."""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from . import _conninfo
from ._commit import IDENTITY_QUERY, Identity
from ._driver import DriverConnection, tuple_cursor
from ._errors import ConfigureError, Failure, classify
from ._retry import testing_scale
from ._role import offers_alternatives, prefer_primary

__all__ = ["PROBE_INTERVAL", "Configure", "Connector", "Conninfo"]

logger = logging.getLogger("aiopg_resilient.pool")

Configure = Callable[[AsyncConnection[Any]], Awaitable[None]]
Conninfo = str | Callable[[], str] | Callable[[], Awaitable[str]]

# A refused connect (nothing listens), a connect closed before any answer (a proxy in
# front of a stopped server), "the database system is starting up / shutting down /
# in recovery" (57P03) and a standby where a read-write session is wanted (a promotion
# under way) cost the server next to nothing: they are probed at most this far apart
# (jittered), so a server back from a restart or a crash is used within it.
PROBE_INTERVAL = 0.15
_CHEAP = (
    "connection refused",
    "server closed the connection unexpectedly",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
)


_SETUP_QUERY = (
    f"{IDENTITY_QUERY}, pg_backend_pid(), "
    "(SELECT extract(epoch FROM backend_start)::text FROM pg_stat_activity "
    "WHERE pid = pg_backend_pid())"
)


class Connector:
    """Opens connections to one server the way the pool wants them."""

    def __init__(
        self,
        conninfo: Conninfo,
        connect_kwargs: dict[str, Any],
        *,
        application_name: str,
        configure: Configure | None,
        probe_interval: float = PROBE_INTERVAL,
        setup_timeout: float = 10.0,
    ) -> None:
        self._source = conninfo
        self._kwargs = connect_kwargs
        self._application_name = application_name
        self.configure = configure
        self.probe_interval = probe_interval
        self.setup_timeout = setup_timeout
        self._pooler_seen = False
        if isinstance(conninfo, str):
            self._fixed: str | None = self._prepare(conninfo)
            self.target = _conninfo.describe(self._fixed)
        else:
            self._fixed = None
            self.target = "<callable conninfo>"

    def _prepare(self, conninfo: str) -> str:
        return _conninfo.apply_defaults(
            conninfo, self._kwargs, application_name=self._application_name
        )

    async def _conninfo(self) -> str:
        if self._fixed is not None:
            return self._fixed
        assert callable(self._source)
        value = self._source()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str):
            raise ConfigureError(
                f"the conninfo callable returned {type(value).__name__}, not a string"
            )
        conninfo = self._prepare(value)
        self.target = _conninfo.describe(conninfo)
        return conninfo

    async def connect(self, *, primary: bool = False) -> DriverConnection:
        """A new connection in autocommit mode, configured; its settings remembered.
        With *primary*, a multi-host conninfo asks for a read-write session."""
        conninfo = await self._conninfo()
        if primary:
            conninfo = prefer_primary(conninfo)
        conn = await DriverConnection.connect(conninfo, autocommit=True, **self._kwargs)
        conn.alternatives = offers_alternatives(conninfo)
        threshold = conn.prepare_threshold
        before = conn.reported_now()
        try:
            # A half-open peer right after login must not wedge the pool's refill.
            with anyio.fail_after(self.setup_timeout):
                if self.configure is not None:
                    try:
                        await self.configure(conn)
                        if conn.pgconn.transaction_status != TransactionStatus.IDLE:
                            raise psycopg.ProgrammingError(
                                "it left the connection inside a transaction; commit it "
                                "or run it in autocommit mode"
                            )
                    except Exception as exc:
                        if conn.closed:
                            raise  # the connection died: a connection failure, retried
                        raise ConfigureError(f"configure() failed: {exc}") from exc
                    if not conn.autocommit:
                        await conn.set_autocommit(True)  # the layer owns transactions
                conn.identity, pid, conn.backend_start = await _identity(conn)
        except BaseException:
            await conn.close()
            raise
        if pid is not None and pid != conn.info.backend_pid:
            # The pid psycopg got at login is not the backend's: a pooler (PgBouncer) is
            # in the path. In its transaction mode the next statement may run on another
            # server connection, where a statement prepared on this one does not exist.
            conn.pooled = True
            if "prepare_threshold" not in self._kwargs and conn.prepare_threshold == threshold:
                conn.prepare_threshold = None  # (unless configure() chose)
            if not self._pooler_seen:
                self._pooler_seen = True
                logger.info(
                    "a connection pooler is in front of %s: server-side prepared statements "
                    "are off (pass prepare_threshold in connect_kwargs to decide yourself)",
                    self.target,
                )
        conn.keep_settings(before)
        return conn

    async def connect_to(self, target: tuple[str, str, str]) -> DriverConnection:
        """A bare connection (no ``configure``) to the server at *target* (host, host
        address, port, as ``conn.info`` says), whatever hosts the conninfo lists."""
        params = conninfo_to_dict(await self._conninfo())
        host, hostaddr, port = target
        params.update(host=host, port=port)
        if hostaddr:
            params["hostaddr"] = hostaddr
        else:
            params.pop("hostaddr", None)
        for key in ("target_session_attrs", "load_balance_hosts"):
            params.pop(key, None)
        conn = await DriverConnection.connect(
            make_conninfo("", **params), autocommit=True, **self._kwargs
        )
        conn.prepare_threshold = None
        return conn

    def delay(self, exc: BaseException, backoff_delay: float, rng: random.Random) -> float:
        """How long to wait before the next attempt after *exc*: the backoff, capped at
        the probe interval for failures that cost the server nothing."""
        if (
            getattr(exc, "sqlstate", None) == "57P03"  # whatever the server's language
            or classify(exc) is Failure.WRONG_ROLE  # a standby, or a promotion under way
            or any(needle in str(exc).lower() for needle in _CHEAP)
        ):
            cap = self.probe_interval * rng.uniform(0.5, 1.0)  # jittered too
            return min(backoff_delay, cap * testing_scale())
        return backoff_delay


async def _identity(
    conn: DriverConnection,
) -> tuple[Identity | None, int | None, str | None]:
    """The incarnation of the server behind *conn*, or None if it cannot be read (then a
    COMMIT in doubt on this connection is `CommitUnknown`, never a guess); the backend's
    pid as the server says it, and when the backend started."""
    try:
        cur = tuple_cursor(conn)
        await cur.execute(_SETUP_QUERY, prepare=False)
        row = await cur.fetchone()
    except psycopg.Error as exc:
        if conn.closed:
            raise
        logger.warning(
            "cannot read the server's identity (%s): a COMMIT in doubt will be CommitUnknown",
            exc,
        )
        return None, None, None
    if row is None:
        return None, None, None
    system_id, started, crash_mark = (None if v is None else str(v) for v in row[:3])
    return (system_id, started, crash_mark), row[3], row[4]
