"""One side of a proxied session: a TCP stream, optionally carrying TLS the proxy terminates.

TLS runs over memory BIOs (`ssl.SSLObject`) rather than asyncio's SSL transport, so the proxy
decides exactly which bytes reach the socket and when: a cut is a close_notify then a FIN at
once (`_Endpoint.send_eof`), a reset an RST (`_Endpoint.abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct

_CHUNK = 65536
"""Largest read from one side; with drain() after each write, this bounds the buffers."""


_CLOSE_PATIENCE = 2.0
"""Seconds a closing socket may take to flush what its peer has not read yet."""


class _Endpoint:
    """One side of a session: a TCP stream, optionally carrying TLS the proxy terminates."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        registry: set[_Endpoint],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._registry = registry  # the proxy's open endpoints, closed at shutdown
        registry.add(self)
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._eof_sent = False

    @property
    def tls(self) -> bool:
        return self._tls is not None

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """Run the TLS handshake; afterwards `read` and `write` carry plaintext."""
        tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        try:
            while not self._handshake_step(tls):
                self._flush_tls()
                data = await self.reader.read(_CHUNK)
                if not data:
                    raise ConnectionResetError("connection closed during the TLS handshake")
                self._incoming.write(data)
        except ssl.SSLError:
            self._flush_tls()  # the alert telling the peer why
            raise
        self._tls = tls
        self._flush_tls()
        await self.writer.drain()

    async def read(self) -> bytes:
        """Next chunk of (plaintext) data, or b"" at the end of the stream."""
        if self._tls is None:
            return await self.reader.read(_CHUNK)
        while True:
            try:
                data = self._tls.read(_CHUNK)
            except ssl.SSLWantReadError:
                raw = await self.reader.read(_CHUNK)
                if raw:
                    self._incoming.write(raw)
                else:
                    self._incoming.write_eof()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            self._flush_tls()  # a post-handshake message may need an answer
            return data

    async def write(self, data: bytes) -> None:
        """Send data (encrypted when TLS is on) and wait until the buffer is below its limit."""
        if self._tls is not None:
            self._tls.write(data)
            data = self._outgoing.read()
        self.writer.write(data)
        await self.writer.drain()

    def send_eof(self) -> None:
        """Close the sending direction gracefully: TLS close_notify (when TLS is on), then FIN."""
        if self._eof_sent or self.writer.transport.is_closing():
            return
        self._eof_sent = True
        if self._tls is not None:
            # unwrap() queues close_notify, then wants the peer's, which we do not wait for.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush_tls()
        if self.writer.can_write_eof():
            # The peer may be gone already (a crashed server behind a frozen session).
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    async def linger(self, timeout: float) -> None:
        """After `send_eof`: discard what the peer still sends until it closes, then close."""
        try:
            await asyncio.wait_for(self._discard(), timeout)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            await self.close()

    def abort(self) -> None:
        """Close abortively: SO_LINGER (1, 0) makes the kernel send an RST."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close the socket (FIN unless already aborted) and wait until it is closed.

        A transport closes only once its buffer is flushed: a peer that stopped reading
        (a client that dropped its end, a frozen path) would hold the close, and with it
        every later cut of this session and the caller waiting for that cut, forever.
        After `_CLOSE_PATIENCE` what it never took is dropped (an RST)."""
        self.writer.close()
        # Shielded: cancelling a task that awaits the transport's close future directly
        # would cancel that shared future for every other waiter.
        try:
            await asyncio.wait_for(asyncio.shield(_wait_closed(self.writer)), _CLOSE_PATIENCE)
        except asyncio.TimeoutError:
            self.writer.transport.abort()
            await asyncio.shield(_wait_closed(self.writer))
        self._registry.discard(self)

    async def _discard(self) -> None:
        while await self.reader.read(_CHUNK):
            pass

    @staticmethod
    def _handshake_step(tls: ssl.SSLObject) -> bool:
        """Advance the handshake with the data received so far; True once it is done."""
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _flush_tls(self) -> None:
        data = self._outgoing.read()
        if data and not self.writer.transport.is_closing():
            self.writer.write(data)


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await writer.wait_closed()
