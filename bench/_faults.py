"""The faults the recovery benchmark injects while readers run: a proxy cut, a terminated
backend, a fast restart and a crash; and `ProxyTarget`, a contender's way through the proxy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiopg_resilient.testing import ChaosProxy, PostgresServer


@dataclass(frozen=True)
class ProxyTarget:
    """The server's login, through a TLS-terminating `ChaosProxy` (a `Target`)."""

    dsn: str
    host: str
    port: int
    user: str
    password: str
    dbname: str
    ca_path: Path | None

    @classmethod
    def of(cls, pg: PostgresServer, proxy: ChaosProxy) -> ProxyTarget:
        dsn = proxy.dsn
        if dsn is None:
            raise RuntimeError("the proxy is not started")
        return cls(dsn, proxy.host, proxy.port, pg.user, pg.password, pg.dbname, pg.ca_path)


Inject = Callable[[PostgresServer, ChaosProxy | None, float], Awaitable[None]]


@dataclass(frozen=True)
class Fault:
    key: str
    name: str
    inject: Inject
    """inject(server, proxy, down_seconds): returns once the fault is over (the server
    accepts connections again, or the connections are gone)."""
    via_proxy: bool = False
    """Contenders connect through the proxy (only the cut needs it)."""
    server_down: bool = False
    """The server goes away for a while; "ready" is when it accepts connections again."""


async def _cut(_: PostgresServer, proxy: ChaosProxy | None, __: float) -> None:
    if proxy is None:
        raise RuntimeError("the cut needs a ChaosProxy")
    # TLS close_notify + FIN to both sides: psycopg's "SSL connection has been closed
    # unexpectedly". The call blocks a few ms: keep it off the event loop.
    await asyncio.to_thread(proxy.cut)


async def _terminate(pg: PostgresServer, _: ChaosProxy | None, __: float) -> None:
    await pg.terminate_backends()  # every client backend; returns once they have exited


async def _restart(pg: PostgresServer, _: ChaosProxy | None, __: float) -> None:
    await pg.restart("fast")  # clients get AdminShutdown


async def _crash(pg: PostgresServer, _: ChaosProxy | None, down: float) -> None:
    await pg.stop("immediate")  # no goodbye to the clients; crash recovery at start
    await asyncio.sleep(down)
    await pg.start()


FAULTS: dict[str, Fault] = {
    f.key: f
    for f in (
        Fault("cut", "proxy cut (TLS close_notify + FIN)", _cut, via_proxy=True),
        Fault("terminate", "backends terminated (pg_terminate_backend)", _terminate),
        Fault("restart", "restart -m fast", _restart, server_down=True),
        Fault("crash", "crash: stop -m immediate, down, start", _crash, server_down=True),
    )
}
