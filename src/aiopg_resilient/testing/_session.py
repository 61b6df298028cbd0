"""One client connection through a `ChaosProxy` and its connection to the server.

A `_Session` sets both up (answering PostgreSQL's SSLRequest itself when the proxy terminates
TLS), then pumps bytes each way until either side ends, applying the proxy's faults on the way:
latency, freezes, and the triggers armed by `ChaosProxy.on_client_message`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal

from ._endpoint import _Endpoint
from ._snapshots import ProxyConnection
from ._trigger import Trigger

if TYPE_CHECKING:
    from ._proxy_loop import _ProxyLoop

logger = logging.getLogger("aiopg_resilient.testing")

_SSL_REQUEST_CODE = 80877103
_GSSENC_REQUEST_CODE = 80877104
_SSL_REQUEST = struct.pack("!ii", 8, _SSL_REQUEST_CODE)
_CONNECT_TIMEOUT = 10.0
_LINGER = 10.0
"""How long a cut socket keeps reading (and discarding) before it is closed.

A socket closed with unread data sends an RST instead of a FIN; lingering until the peer
closes (as nginx's lingering_close does) keeps a cut a clean FIN whatever the client sends.
"""
_CloseHow = Literal["cut", "reset", "close"]
_Direction = Literal["up", "down"]


class _ProtocolError(Exception):
    """The upstream server did not answer as PostgreSQL does."""


class _Session:
    """One client connection and its upstream connection, with a pump for each direction."""

    def __init__(
        self, proxy: _ProxyLoop, sock: socket.socket, ident: int, *, client_port: int, frozen: bool
    ) -> None:
        self.proxy = proxy
        self.id = ident
        self.client_port = client_port
        self.client: _Endpoint | None = None
        self.upstream: _Endpoint | None = None
        self.created_at = self.last_activity = time.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0
        self._sock = sock
        self._gates: dict[_Direction, asyncio.Event] = {
            "up": asyncio.Event(),
            "down": asyncio.Event(),
        }
        if not frozen:
            self.thaw()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closed = asyncio.Event()

    @property
    def frozen(self) -> bool:
        return not all(gate.is_set() for gate in self._gates.values())

    def freeze(self) -> None:
        for gate in self._gates.values():
            gate.clear()

    def thaw(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def snapshot(self) -> ProxyConnection:
        return ProxyConnection(
            id=self.id,
            client_port=self.client_port,
            upstream_port=self.upstream.local_port if self.upstream is not None else None,
            created_at=self.created_at,
            last_activity=self.last_activity,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            frozen=self.frozen,
            tls=self.client is not None and self.client.tls,
        )

    def start(self) -> None:
        self._start_task(self._run(), f"chaos-proxy-session-{self.id}")

    async def close(self, how: _CloseHow, *, announce: Callable[[], None] | None = None) -> bool:
        """Close both sides: "cut" (FIN), "reset" (RST) or "close" (end of stream).

        Safe to call from one of the session's own tasks. `announce` is called just before
        the sockets are closed, so whoever sees the close can already see it announced.
        Returns False if the session was already closing, after waiting until it is closed.
        """
        if self._closing:
            await self._closed.wait()
            return False
        self._closing = True
        self.proxy.forget(self)
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others)
        if self.client is None:
            self._sock.close()
        endpoints = [e for e in (self.client, self.upstream) if e is not None]
        if announce is not None:
            announce()
        if how == "reset":
            for endpoint in endpoints:
                endpoint.abort()
            for endpoint in endpoints:
                await endpoint.close()
        elif how == "cut":
            for endpoint in endpoints:
                endpoint.send_eof()
                self.proxy.spawn(endpoint.linger(_LINGER), f"chaos-proxy-linger-{self.id}")
        else:
            for endpoint in endpoints:
                await endpoint.close()
        logger.debug("connection %d closed (%s)", self.id, how)
        self._closed.set()
        return True

    def _start_task(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = self.proxy.spawn(coro, name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self) -> None:
        how: _CloseHow = "close"
        try:
            try:
                await self._open()
            except (OSError, EOFError, ssl.SSLError, _ProtocolError, asyncio.TimeoutError) as exc:
                logger.debug("connection %d could not be set up: %r", self.id, exc)
                how = "cut"
                return
            assert self.client is not None
            assert self.upstream is not None
            logger.debug("connection %d open: client port %d", self.id, self.client_port)
            pending = {
                self._start_task(self._pump(self.client, self.upstream, "up"), f"up-{self.id}"),
                self._start_task(self._pump(self.upstream, self.client, "down"), f"dn-{self.id}"),
            }
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not all(task.result() for task in done):
                    how = "reset"
                    break
        finally:
            if not self._closing:
                await self.close(how)

    async def _open(self) -> None:
        reader, writer = await asyncio.open_connection(sock=self._sock)
        self.client = _Endpoint(reader, writer, self.proxy.endpoints)
        for gate in self._gates.values():  # a connection accepted frozen is a black hole
            await gate.wait()
        first = b""
        if self.proxy.tls is not None:
            first = await self._negotiate_client(self.client, self.proxy.tls)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.proxy.upstream_host, self.proxy.upstream_port),
            _CONNECT_TIMEOUT,
        )
        self.upstream = _Endpoint(reader, writer, self.proxy.endpoints)
        if self.proxy.upstream_tls is not None:
            await self._negotiate_upstream(self.upstream, self.proxy.upstream_tls)
        if first:
            await self.upstream.write(first)
            self.bytes_up += len(first)

    async def _negotiate_client(self, client: _Endpoint, context: ssl.SSLContext) -> bytes:
        """Answer the client's SSLRequest and run TLS; return bytes to forward as they are."""
        while True:
            head = await client.reader.readexactly(8)
            length, code = struct.unpack("!ii", head)
            if length == 8 and code == _GSSENC_REQUEST_CODE:
                client.writer.write(b"N")  # no GSSAPI encryption here; the client goes on
                continue
            if length == 8 and code == _SSL_REQUEST_CODE:
                client.writer.write(b"S")
                await client.start_tls(context, server_side=True)
                return b""
            return head  # a plaintext StartupMessage or CancelRequest

    async def _negotiate_upstream(self, upstream: _Endpoint, context: ssl.SSLContext) -> None:
        upstream.writer.write(_SSL_REQUEST)
        answer = await upstream.reader.readexactly(1)
        if answer != b"S":
            raise _ProtocolError(f"the server answered {answer!r} to SSLRequest")
        await upstream.start_tls(
            context, server_side=False, server_hostname=self.proxy.upstream_host
        )

    async def _pump(self, src: _Endpoint, dst: _Endpoint, direction: _Direction) -> bool:
        """Copy src to dst until EOF (True) or a connection error (False)."""
        gate = self._gates[direction]
        try:
            while data := await src.read():
                self.last_activity = time.monotonic()
                if self.proxy.latency:
                    await asyncio.sleep(self.proxy.latency)
                await gate.wait()
                trigger = self.proxy.match_trigger(data) if direction == "up" else None
                if trigger is not None:
                    if await self._fire(trigger, data):
                        return True
                    continue
                await dst.write(data)
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
            dst.send_eof()
            return True
        except (OSError, ssl.SSLError) as exc:
            logger.debug("connection %d %s: %r", self.id, direction, exc)
            return False

    async def _fire(self, trigger: Trigger, data: bytes) -> bool:
        """Carry out a trigger's action on the chunk `data`; True if the session is gone."""
        assert self.upstream is not None
        logger.info("connection %d: %s on %r", self.id, trigger.action, trigger.pattern)
        self.freeze()  # hold back every reply from here on
        if trigger.action == "cut_before":
            await self.close("cut", announce=lambda: trigger._record(self.id))
            return True
        if trigger.action == "freeze_before":
            trigger._record(self.id)
            await self._gates["up"].wait()
            await self.upstream.write(data)
            self.bytes_up += len(data)
            return False
        await self.upstream.write(data)
        self.bytes_up += len(data)
        if trigger.action == "cut_after":
            await self.close("cut", announce=lambda: trigger._record(self.id))
            return True
        trigger._record(self.id)  # freeze_after: stays frozen until thawed
        return False
