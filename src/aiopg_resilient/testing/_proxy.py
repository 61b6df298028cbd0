"""A fault-injecting TCP proxy to put between a PostgreSQL client and server.

`ChaosProxy` runs its own asyncio event loop in a background thread, so it works the
same under any async framework and from synchronous code. Every fault method is a plain,
thread-safe call that returns once the fault has happened on the wire::

    with ChaosProxy.for_server(server, tls=True) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn)
        proxy.cut()          # TLS close_notify + FIN to the client and the server
        await conn.execute("SELECT 1")   # OperationalError: SSL connection has been closed ...

Two modes:

* pass-through (``tls=None``): bytes are copied both ways; the client's TLS session goes end
  to end to the server, so the proxy can only cut, reset, delay or stall the TCP stream.
* TLS-terminating (``tls=`` a server-side `ssl.SSLContext`): the proxy answers PostgreSQL's
  SSLRequest itself, terminates the client's TLS and opens its own session to the server,
  like a cloud database proxy. It sees the protocol in plaintext, so a cut sends a TLS
  close_notify before the FIN and `ChaosProxy.on_client_message` can act on a given message.

TLS is run over memory BIOs (`ssl.SSLObject`) rather than asyncio's SSL transport, so the
proxy decides exactly which bytes reach the socket and when: asyncio's transport waits for
the peer's close_notify (up to 30 s) before it sends the FIN, which is not what a proxy that
drops a session does.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from ._loop_thread import _LoopThread
from ._proxy_loop import _ProxyLoop
from ._snapshots import ConnectionSelector, ProxyConnection, ProxyStats
from ._trigger import _TRIGGER_ACTIONS, Trigger, TriggerAction

__all__ = [
    "ChaosProxy",
    "ConnectionSelector",
    "ProxyConnection",
    "ProxyStats",
    "Trigger",
    "TriggerAction",
]

logger = logging.getLogger("aiopg_resilient.testing")

_T = TypeVar("_T")

_CALL_TIMEOUT = 10.0
"""How long a fault method waits for the proxy thread to carry it out."""


class _Server(Protocol):
    """What `ChaosProxy.for_server` needs from a `PostgresServer`."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def conninfo(self, **overrides: Any) -> str: ...

    def proxy_ssl_contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]: ...


class ChaosProxy:
    """An in-process TCP proxy that injects real faults between a client and PostgreSQL.

    Use it as a context manager (``with`` or ``async with``); it listens on
    ``listen_host:listen_port`` (port 0 picks a free one, see `port`) and forwards to
    ``upstream_host:upstream_port``. With `tls` (a server-side context) it terminates the
    client's TLS and connects upstream with `upstream_tls` (plaintext when None).

    Fault methods take `which`: None for every current connection, an iterable of connection
    ids, or a predicate on a `ProxyConnection`. They are thread-safe and return once the
    fault has happened; called from async code they hold up the caller's event loop for the
    few milliseconds that takes (wrap them in ``anyio.to_thread.run_sync`` if that matters).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        tls: ssl.SSLContext | None = None,
        upstream_tls: ssl.SSLContext | None = None,
    ) -> None:
        if not 0 <= listen_port <= 65535 or not 0 < upstream_port <= 65535:
            raise ValueError("ports must be in 1..65535 (listen_port may be 0)")
        self._server: _Server | None = None
        self._dsn: str | None = None
        self._thread = _LoopThread("aiopg-resilient-chaos-proxy")
        self._used = False
        # Its state changes only on the proxy's loop, through `_call`.
        self._on_loop = _ProxyLoop(
            upstream_host,
            upstream_port,
            listen_host=listen_host,
            listen_port=listen_port,
            tls=tls,
            upstream_tls=upstream_tls,
        )

    @classmethod
    def for_server(cls, server: _Server, *, tls: bool = False) -> ChaosProxy:
        """A proxy in front of a `PostgresServer`; `dsn` connects through it once started.

        With ``tls=True`` the proxy terminates TLS with a certificate from the server's test
        CA, so clients keep ``sslmode=verify-full`` in both modes.
        """
        if tls:
            client_side, upstream_side = server.proxy_ssl_contexts()
            proxy = cls(server.host, server.port, tls=client_side, upstream_tls=upstream_side)
        else:
            proxy = cls(server.host, server.port)
        proxy._server = server
        return proxy

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        return self._on_loop.host

    @property
    def port(self) -> int:
        """The port the proxy listens on (the real one once started)."""
        if self._on_loop.port == 0:
            raise RuntimeError("the proxy has no port until it is started")
        return self._on_loop.port

    @property
    def dsn(self) -> str | None:
        """A DSN through the proxy, when built by `for_server` and started; else None."""
        return self._dsn

    @property
    def running(self) -> bool:
        """Whether the proxy's thread is running."""
        return self._thread.running

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        """Start the proxy thread and listen. A proxy is started once."""
        if self._used:
            raise RuntimeError("a ChaosProxy can only be started once")
        self._used = True
        self._thread.start()
        try:
            self._call(self._on_loop.listen)
        except BaseException:
            self.close()
            raise
        if self._server is not None:
            self._dsn = self._server.conninfo(host=self.host, port=self.port)
        on_loop = self._on_loop
        logger.info(
            "chaos proxy %s:%d -> %s:%d started (tls=%s)",
            on_loop.host,
            on_loop.port,
            on_loop.upstream_host,
            on_loop.upstream_port,
            on_loop.tls is not None,
        )
        return self

    def close(self) -> None:
        """Close every connection and socket, cancel every task, stop the thread."""
        if not self._thread.running:
            return
        try:
            self._call(self._on_loop.shutdown, timeout=30.0)
        finally:
            self._thread.stop()
        logger.info("chaos proxy %s:%d closed", self._on_loop.host, self._on_loop.port)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> ChaosProxy:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.close)

    def __repr__(self) -> str:
        on_loop = self._on_loop
        port = on_loop.port or "?"
        return (
            f"<ChaosProxy {on_loop.host}:{port} -> {on_loop.upstream_host}:{on_loop.upstream_port}"
            f" tls={on_loop.tls is not None} running={self.running}>"
        )

    # -- inspection ------------------------------------------------------------------------

    @property
    def connections(self) -> list[ProxyConnection]:
        """Snapshots of the open connections, oldest first."""
        return self._call(self._on_loop.snapshots)

    @property
    def stats(self) -> ProxyStats:
        """Connections accepted, open now, and open at most at once."""
        return self._call(self._on_loop.stats)

    def reset_stats(self) -> None:
        """Restart the counters: `accepted` from 0, `peak_open` from the connections open now.

        Connection ids keep counting up.
        """
        self._call(self._on_loop.reset_stats)

    # -- faults ----------------------------------------------------------------------------

    def cut(self, which: ConnectionSelector = None) -> int:
        """Close connections gracefully on both sides; return how many were cut.

        The client and the server each get a FIN, preceded by a TLS close_notify where the
        proxy terminates TLS. Held and in-flight data is dropped.
        """
        return self._call(lambda: self._on_loop.close_sessions(which, "cut"))

    def reset(self, which: ConnectionSelector = None) -> int:
        """Close connections abortively (TCP RST) on both sides; return how many."""
        return self._call(lambda: self._on_loop.close_sessions(which, "reset"))

    def freeze(self, which: ConnectionSelector = None) -> int:
        """Stop forwarding in both directions, keeping the sockets open; return how many.

        The peers' kernels still get ACKs, so this is a half-open connection: data is held
        (up to the buffer limits, then the senders block) until `thaw`.
        """
        return self._call(lambda: self._on_loop.set_frozen(which, True))

    def thaw(self, which: ConnectionSelector = None) -> int:
        """Resume forwarding, held data first; return how many connections were frozen."""
        return self._call(lambda: self._on_loop.set_frozen(which, False))

    def freeze_new(self, on: bool) -> None:
        """Accept new connections frozen (a black hole: nothing is answered or forwarded)."""
        self._call(lambda: self._on_loop.set_freeze_new(on))

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by `seconds` in each direction (0 turns it off)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._call(lambda: self._on_loop.set_latency(float(seconds)))

    def idle_cut(self, seconds: float | None) -> None:
        """Cut connections idle (no byte either way) for longer than `seconds`; None: off.

        Like a load balancer's idle timeout; checked every 50 ms at most.
        """
        if seconds is not None and seconds <= 0:
            raise ValueError("the idle timeout must be > 0 (or None to turn it off)")
        self._call(lambda: self._on_loop.set_idle_cut(seconds))

    def refuse(self) -> None:
        """Stop listening: new connects are refused (ECONNREFUSED); open ones carry on."""
        self._call(self._on_loop.stop_listening)

    def accept(self) -> None:
        """Listen again, on the same port, after `refuse`."""
        self._call(self._on_loop.listen)

    def on_client_message(
        self, pattern: bytes, action: TriggerAction, *, once: bool = True
    ) -> Trigger:
        """Arm a fault for the next client->server chunk containing `pattern` (every such
        chunk with ``once=False``), on any connection.

        Only works where the proxy sees plaintext: TLS-terminating mode, or pass-through
        with ``sslmode=disable``. A pattern split across two TCP chunks is not seen.
        psycopg sends ``conn.commit()`` as a simple query, so ``b"COMMIT"`` catches it.
        Actions, on the connection that sent the chunk:

        * ``"cut_before"``: drop the chunk and cut both sides: the server never sees it.
        * ``"cut_after"``: forward it, then cut both sides without relaying any reply: the
          server runs it (it reads the chunk before the FIN) but the client never learns.
        * ``"freeze_before"``: hold the chunk and freeze the connection.
        * ``"freeze_after"``: forward it and freeze: the server runs it, the reply is held.
        """
        if action not in _TRIGGER_ACTIONS:
            raise ValueError(f"unknown trigger action {action!r}")
        if not pattern:
            raise ValueError("the pattern must not be empty")
        trigger = Trigger(self, pattern, action, once=once)
        self._call(lambda: self._on_loop.add_trigger(trigger))
        return trigger

    # -- plumbing --------------------------------------------------------------------------

    def _call(
        self, factory: Callable[[], Coroutine[Any, Any, _T]], *, timeout: float = _CALL_TIMEOUT
    ) -> _T:
        """Run `factory()` on the proxy loop and wait for its result."""
        return self._thread.call(factory, timeout)

    def _remove_trigger(self, trigger: Trigger) -> None:
        """Disarm `trigger` (see `Trigger.remove`); a no-op once the proxy is closed."""
        if self.running:
            self._call(lambda: self._on_loop.remove_trigger(trigger))


ChaosProxy.__module__ = "aiopg_resilient.testing"
