"""Looking at the backends of statements that are slow to answer (see `_watch`).

One look serves every watched statement of a server: the first watcher that needs it
runs one query for all of them (``pid`` and ``backend_start``, so a reused pid is never
mistaken for ours) on a connection of the looker's own to that very server (its host,
address and port, whatever the conninfo lists; no ``configure``, not in the pool's
counts), and the answer is shared for half a ``patience``. The look also reads the
server's identity: an answer from another server, or from another life of it, proves
nothing ("cannot look"). The connection is closed when no statement is watched there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._driver import DriverConnection, tuple_cursor

__all__ = ["CANNOT", "Looker", "Target", "Watched"]

logger = logging.getLogger("aiopg_resilient.pool")

Target = tuple[str, str, str]
"""Where a connection is: host, host address, port (``conn.info``)."""

CANNOT = object()
"""The look could not tell (no connection, another server, the server hides it)."""

_LOOK = (
    "SELECT (SELECT system_identifier::text FROM pg_control_system()), "
    "extract(epoch FROM pg_postmaster_start_time())::text, "
    "(SELECT json_agg(json_build_array(a.pid, a.state, a.wait_event, "
    "   extract(epoch FROM statement_timestamp() - a.state_change))) "
    " FROM pg_stat_activity a "
    " JOIN unnest(%(pids)s::int[], %(starts)s::text[]) AS w(pid, start) "
    " ON a.pid = w.pid AND extract(epoch FROM a.backend_start)::text = w.start)"
)
# Only a backend that is not working for anyone: done and holding a transaction, or
# blocked on a client that is silent.
_TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %(pid)s AND extract(epoch FROM backend_start)::text = %(start)s "
    "AND (state LIKE 'idle in transaction%%' "
    "     OR (state = 'active' AND wait_event IN ('ClientRead', 'ClientWrite')))"
)


@dataclass(eq=False)
class Watched:
    """A statement being watched: its connection's server and backend."""

    target: Target
    identity: tuple[str | None, str | None]
    pid: int
    start: str


@dataclass
class _Server:
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    watched: set[Watched] = field(default_factory=set)
    conn: DriverConnection | None = None
    at: float = 0.0
    identity: tuple[str | None, str | None] | None = None
    rows: dict[int, tuple[Any, Any, Any]] = field(default_factory=dict)


class Looker:
    """Looks at watched backends, one query and one connection per server."""

    def __init__(
        self, connect: Callable[[Target], Awaitable[DriverConnection]], patience: float
    ) -> None:
        self._connect = connect
        self._patience = patience
        self._servers: dict[Target, _Server] = {}

    def watch(self, watched: Watched) -> None:
        self._servers.setdefault(watched.target, _Server()).watched.add(watched)

    async def unwatch(self, watched: Watched) -> None:
        server = self._servers.get(watched.target)
        if server is None:
            return
        server.watched.discard(watched)
        if not server.watched:
            del self._servers[watched.target]
            await self._drop(server)

    async def close(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            await self._drop(server)

    async def look(self, watched: Watched, *, fresh: bool = False) -> Any:
        """``(state, wait_event, seconds in that state)`` of the watched backend, None
        if it is gone, or `CANNOT`."""
        server = self._servers.get(watched.target)
        if server is None:
            return CANNOT
        async with server.lock:
            if fresh or time.monotonic() - server.at > self._patience / 2:
                try:
                    with anyio.fail_after(self._patience):
                        await self._refresh(server)
                except Exception as exc:
                    logger.debug("cannot look at %s (%s)", watched.target, exc)
                    await self._drop(server)
                    return CANNOT
        if server.identity != watched.identity or None in watched.identity:
            return CANNOT  # another server answers there now: its pids prove nothing
        return server.rows.get(watched.pid)

    async def terminate(self, watched: Watched) -> bool:
        """End the watched backend if it is not working for anyone; True once it is
        gone (looked again until then, for at most *patience*)."""
        server = self._servers.get(watched.target)
        if server is None or server.conn is None:
            return False
        try:
            with anyio.fail_after(self._patience):
                async with server.lock:
                    assert server.conn is not None
                    params = {"pid": watched.pid, "start": watched.start}
                    await tuple_cursor(server.conn).execute(_TERMINATE, params, prepare=False)
                while True:
                    row = await self.look(watched, fresh=True)
                    if row is None:
                        return True
                    if row is CANNOT:
                        return False
                    await anyio.sleep(0.02)
        except Exception as exc:
            logger.debug("could not end backend %s (%s)", watched.pid, exc)
            return False

    async def _refresh(self, server: _Server) -> None:
        if server.conn is None or server.conn.closed:
            target = next(iter(server.watched)).target
            conn = await self._connect(target)
            if self._servers.get(target) is not server:  # nobody watches there any more
                await conn.close()
                raise RuntimeError("no statement is watched there any more")
            server.conn = conn
        pids = [w.pid for w in server.watched]
        starts = [w.start for w in server.watched]
        cur = tuple_cursor(server.conn)
        await cur.execute(_LOOK, {"pids": pids, "starts": starts}, prepare=False)
        row = await cur.fetchone()
        assert row is not None
        server.identity = (row[0], row[1])
        server.rows = {int(pid): (state, wait, age) for pid, state, wait, age in row[2] or ()}
        server.at = time.monotonic()

    async def _drop(self, server: _Server) -> None:
        conn, server.conn, server.at = server.conn, None, 0.0
        if conn is not None:
            await conn.close()
