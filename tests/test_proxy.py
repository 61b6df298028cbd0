"""Tests of ChaosProxy itself, against small threaded echo servers (and one real PostgreSQL).

The proxy runs in its own thread, so most tests here are synchronous: a blocking socket on
one side, an echo server thread on the other. An echo server records how each of its
connections ended ("eof", "close_notify", "reset"), so each fault is checked on both sides.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import trustme

from aiopg_resilient.testing import ChaosProxy, PostgresServer
from aiopg_resilient.testing._proxy import ProxyStats

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
PROXY_THREAD = "aiopg-resilient-chaos-proxy"


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte; with `tls`, first answers PostgreSQL's SSLRequest and runs TLS."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.tls = tls
        self.received = bytearray()
        self.outcomes: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def record(self, data: bytes = b"", outcome: str | None = None) -> None:
        with self._lock:
            self.received += data
            if outcome is not None:
                self.outcomes.append(outcome)

    def wait_outcomes(self, count: int, timeout: float = 3.0) -> list[str]:
        """The endings of the first `count` connections, once that many have ended."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count:
            assert time.monotonic() < deadline, f"only {self.outcomes} after {timeout}s"
            time.sleep(0.01)
        return list(self.outcomes)

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


class _EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        outcome = "eof"
        try:
            if self.server.tls is not None:
                assert recv_exactly(sock, 8) == SSL_REQUEST
                sock.sendall(b"S")
                sock = self.server.tls.wrap_socket(
                    sock, server_side=True, suppress_ragged_eofs=False
                )
                outcome = "close_notify"  # recv() returns b"" only after a close_notify
            while data := sock.recv(65536):
                self.server.record(data)
                sock.sendall(data)
        except ssl.SSLEOFError:
            outcome = "eof"
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = repr(exc)
        finally:
            sock.close()
        self.server.record(outcome=outcome)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {data!r}")
        data += chunk
    return data


def connect(proxy: ChaosProxy, timeout: float = 3.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PROXY_THREAD]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server side with a cert for 127.0.0.1, client side trusting the CA)."""
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_side)
    client_side = ssl.create_default_context()
    ca.configure_trust(client_side)
    return server_side, client_side


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def proxy(echo_server: EchoServer) -> Iterator[ChaosProxy]:
    with ChaosProxy("127.0.0.1", echo_server.port) as proxy:
        yield proxy


@pytest.fixture
def tls_echo_server(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[EchoServer]:
    with EchoServer(tls=tls_contexts[0]) as server:
        yield server


@pytest.fixture
def tls_proxy(
    tls_echo_server: EchoServer, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> Iterator[ChaosProxy]:
    server_side, client_side = tls_contexts
    with ChaosProxy(
        "127.0.0.1", tls_echo_server.port, tls=server_side, upstream_tls=client_side
    ) as proxy:
        yield proxy


def tls_connect(proxy: ChaosProxy, context: ssl.SSLContext) -> ssl.SSLSocket:
    """Connect as libpq does: SSLRequest, b"S", then TLS."""
    sock = connect(proxy)
    sock.sendall(SSL_REQUEST)
    assert recv_exactly(sock, 1) == b"S"
    return context.wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False)


# -- pass-through ---------------------------------------------------------------------------


def test_pass_through_copies_bytes_both_ways(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """Bytes go through unchanged, large payloads included, and are counted per connection."""
    payload = bytes(range(256)) * 4096  # 1 MiB: more than any buffer, so backpressure works
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()
        [conn] = proxy.connections
        assert (conn.bytes_up, conn.bytes_down) == (len(payload), len(payload))
        assert conn.client_port == sock.getsockname()[1]
        assert conn.upstream_port is not None
        assert not conn.frozen
        assert not conn.tls
    assert proxy.stats.accepted == 1
    assert echo_server.wait_outcomes(1) == ["eof"]


def test_client_eof_is_passed_on(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """A client's FIN reaches the server, and the server's close reaches the client."""
    with connect(proxy) as sock:
        assert echo(sock, b"bye") == b"bye"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    assert echo_server.wait_outcomes(1) == ["eof"]
    deadline = time.monotonic() + 3
    while proxy.stats.open:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# -- cut, reset ------------------------------------------------------------------------------


def test_cut_sends_fin_to_both_sides(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """cut() closes gracefully: the client reads EOF, the server sees EOF, not a reset."""
    with connect(proxy) as sock:
        assert echo(sock, b"hello") == b"hello"
        assert proxy.cut() == 1
        assert sock.recv(10) == b""
        assert echo_server.wait_outcomes(1) == ["eof"]
        assert proxy.connections == []
        assert proxy.cut() == 0


def test_reset_sends_rst_to_both_sides(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """reset() closes abortively: ConnectionResetError on the client and on the server."""
    with connect(proxy) as sock:
        assert echo(sock, b"hello") == b"hello"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert echo_server.wait_outcomes(1) == ["reset"]


def test_faults_select_connections_by_id_or_predicate(proxy: ChaosProxy) -> None:
    """A fault given ids or a predicate touches those connections only."""
    with connect(proxy) as a, connect(proxy) as b, connect(proxy) as c:
        for sock in (a, b, c):
            echo(sock, b"x")
        first, second, third = proxy.connections
        assert proxy.cut([first.id]) == 1
        assert proxy.reset(lambda conn: conn.client_port == third.client_port) == 1
        assert a.recv(1) == b""
        with pytest.raises(ConnectionResetError):
            c.recv(1)
        assert echo(b, b"still here") == b"still here"
        assert [conn.id for conn in proxy.connections] == [second.id]


def test_clients_that_reset_at_once_do_not_stop_accepting(proxy: ChaosProxy) -> None:
    """Connections reset right after the handshake are dropped; the proxy keeps accepting."""
    for _ in range(20):
        with socket.create_connection((proxy.host, proxy.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with connect(proxy) as sock:
        assert echo(sock, b"still accepting") == b"still accepting"


# -- freeze, latency, idle cut -----------------------------------------------------------------


def test_freeze_holds_data_and_thaw_delivers_it(proxy: ChaosProxy) -> None:
    """A frozen connection stays open but forwards nothing; thaw() delivers the held data."""
    with connect(proxy) as sock:
        echo(sock, b"warm")
        assert proxy.freeze() == 1
        assert [conn.frozen for conn in proxy.connections] == [True]
        sock.sendall(b"held")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert proxy.thaw() == 1
        sock.settimeout(3)
        assert recv_exactly(sock, 4) == b"held"


def test_freeze_new_makes_a_black_hole(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """With freeze_new(True) a new connection is accepted but never answered until thawed."""
    proxy.freeze_new(True)
    with connect(proxy) as sock:
        sock.sendall(b"anyone?")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert echo_server.received == b""
        proxy.freeze_new(False)
        proxy.thaw()
        sock.settimeout(3)
        assert recv_exactly(sock, 7) == b"anyone?"


def test_latency_delays_each_direction(proxy: ChaosProxy) -> None:
    """set_latency(d) adds at least d per direction, so 2*d to a round trip; 0 turns it off."""
    with connect(proxy) as sock:
        echo(sock, b"warm")
        proxy.set_latency(0.1)
        start = time.monotonic()
        echo(sock, b"slow")
        assert time.monotonic() - start >= 0.2
        proxy.set_latency(0)
        start = time.monotonic()
        echo(sock, b"fast")
        assert time.monotonic() - start < 0.2


def test_idle_cut_closes_idle_connections_only(proxy: ChaosProxy) -> None:
    """idle_cut(t) cuts a connection silent for t, and spares one that keeps talking."""
    with connect(proxy) as idle, connect(proxy) as busy:
        echo(idle, b"x")
        echo(busy, b"x")
        proxy.idle_cut(0.3)
        idle.settimeout(0.05)
        start = time.monotonic()
        while time.monotonic() - start < 2:
            assert echo(busy, b"ping") == b"ping"
            try:
                if idle.recv(1) == b"":
                    break
            except TimeoutError:
                pass
        else:
            pytest.fail("the idle connection was not cut")
        assert time.monotonic() - start >= 0.2
        assert echo(busy, b"alive") == b"alive"
        proxy.idle_cut(None)
        time.sleep(0.4)
        assert echo(busy, b"no idle cut") == b"no idle cut"


# -- refuse, accept -------------------------------------------------------------------------


def test_refuse_then_accept_on_the_same_port(proxy: ChaosProxy) -> None:
    """refuse() gives ECONNREFUSED and keeps open connections; accept() listens again."""
    port = proxy.port
    with connect(proxy) as sock:
        echo(sock, b"x")
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        assert echo(sock, b"still open") == b"still open"
        proxy.accept()
        assert proxy.port == port
        with connect(proxy) as again:
            assert echo(again, b"back") == b"back"
    assert proxy.stats.accepted == 2


def test_stats_count_accepted_open_and_peak(proxy: ChaosProxy) -> None:
    """stats counts accepted, open and peak open connections; reset_stats() restarts them."""
    with connect(proxy) as a, connect(proxy) as b:
        echo(a, b"x")
        echo(b, b"x")
        assert proxy.stats == ProxyStats(accepted=2, open=2, peak_open=2)
        proxy.cut([1])
        proxy.reset_stats()
        assert proxy.stats == ProxyStats(accepted=0, open=1, peak_open=1)
        with connect(proxy) as c:
            echo(c, b"x")
            assert [conn.id for conn in proxy.connections] == [2, 3]
        assert proxy.stats.accepted == 1
        assert proxy.stats.peak_open == 2


# -- TLS ------------------------------------------------------------------------------------


def test_tls_proxy_terminates_tls_and_cut_sends_close_notify(
    tls_proxy: ChaosProxy,
    tls_echo_server: EchoServer,
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """In TLS mode the proxy answers SSLRequest, and a cut is close_notify then FIN, both ways."""
    with tls_connect(tls_proxy, tls_contexts[1]) as sock:
        assert echo(sock, b"secret") == b"secret"
        assert tls_echo_server.received == b"secret"
        assert [conn.tls for conn in tls_proxy.connections] == [True]
        assert tls_proxy.cut() == 1
        assert sock.recv(10) == b""  # a ragged EOF would raise SSLEOFError here
    assert tls_echo_server.wait_outcomes(1) == ["close_notify"]


def test_tls_proxy_answers_gssenc_request_with_n(
    tls_proxy: ChaosProxy, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A GSSENCRequest gets b"N" and the client can go on with an SSLRequest."""
    with connect(tls_proxy) as raw:
        raw.sendall(GSSENC_REQUEST)
        assert recv_exactly(raw, 1) == b"N"
        raw.sendall(SSL_REQUEST)
        assert recv_exactly(raw, 1) == b"S"
        with tls_contexts[1].wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert echo(sock, b"after gss") == b"after gss"


def test_tls_proxy_forwards_a_plaintext_startup(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], echo_server: EchoServer
) -> None:
    """A client that skips SSLRequest talks plaintext through a TLS-terminating proxy."""
    startup = struct.pack("!ii", 16, 196608) + b"user\0\0\0\0"
    with (
        ChaosProxy("127.0.0.1", echo_server.port, tls=tls_contexts[0]) as proxy,
        connect(proxy) as sock,
    ):
        assert echo(sock, startup) == startup
        assert [conn.tls for conn in proxy.connections] == [False]


def test_pass_through_cut_of_a_tls_session_is_a_ragged_eof(
    proxy: ChaosProxy, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Through a plain proxy TLS is end to end, so a cut is a FIN without close_notify."""
    with (
        EchoServer(tls=tls_contexts[0]) as server,
        ChaosProxy("127.0.0.1", server.port) as plain,
        tls_connect(plain, tls_contexts[1]) as sock,
    ):
        assert echo(sock, b"x") == b"x"
        plain.cut()
        with pytest.raises(ssl.SSLEOFError):
            sock.recv(10)


# -- message triggers --------------------------------------------------------------------------


def test_trigger_cut_before_drops_the_message(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """cut_before: the matching chunk never reaches the server and the client sees EOF."""
    trigger = proxy.on_client_message(b"COMMIT", "cut_before")
    with connect(proxy) as sock:
        assert echo(sock, b"BEGIN") == b"BEGIN"
        sock.sendall(b"COMMIT")
        assert sock.recv(10) == b""
    assert trigger.fired.wait(3)
    assert trigger.connection_ids == [1]
    assert echo_server.wait_outcomes(1) == ["eof"]
    assert echo_server.received == b"BEGIN"


def test_trigger_cut_after_delivers_but_drops_the_reply(
    proxy: ChaosProxy, echo_server: EchoServer
) -> None:
    """cut_after: the server receives the chunk, the client gets EOF instead of the reply."""
    proxy.on_client_message(b"COMMIT", "cut_after")
    with connect(proxy) as sock:
        sock.sendall(b"COMMIT")
        assert sock.recv(10) == b""
    assert echo_server.wait_outcomes(1) == ["eof"]
    assert echo_server.received == b"COMMIT"


def test_trigger_freeze_after_holds_the_reply(proxy: ChaosProxy, echo_server: EchoServer) -> None:
    """freeze_after: the server gets the chunk, the reply is held until thaw(); once=True."""
    trigger = proxy.on_client_message(b"COMMIT", "freeze_after")
    with connect(proxy) as sock:
        sock.sendall(b"COMMIT")
        assert trigger.fired.wait(3)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert echo_server.received == b"COMMIT"
        proxy.thaw()
        sock.settimeout(3)
        assert recv_exactly(sock, 6) == b"COMMIT"
        assert echo(sock, b"COMMIT again") == b"COMMIT again"
    assert trigger.count == 1


def test_trigger_freeze_before_holds_the_message(
    proxy: ChaosProxy, echo_server: EchoServer
) -> None:
    """freeze_before: the server gets nothing until thaw(); remove() disarms a trigger."""
    trigger = proxy.on_client_message(b"COMMIT", "freeze_before")
    unused = proxy.on_client_message(b"ROLLBACK", "cut_before")
    unused.remove()
    with connect(proxy) as sock:
        sock.sendall(b"COMMIT")
        assert trigger.fired.wait(3)
        time.sleep(0.2)
        assert echo_server.received == b""
        proxy.thaw()
        assert recv_exactly(sock, 6) == b"COMMIT"
        assert echo(sock, b"ROLLBACK") == b"ROLLBACK"
    assert not unused.fired.is_set()


# -- lifecycle ------------------------------------------------------------------------------


def test_close_leaves_no_thread_socket_or_task(echo_server: EchoServer) -> None:
    """close() ends every connection and the thread; the proxy cannot be used afterwards."""
    before = len(proxy_threads())
    proxy = ChaosProxy("127.0.0.1", echo_server.port)
    with proxy, connect(proxy) as sock, connect(proxy) as frozen:
        echo(sock, b"x")
        echo(frozen, b"x")
        proxy.freeze([2])
        proxy.idle_cut(10)
        proxy.on_client_message(b"never", "freeze_after")
        assert len(proxy_threads()) == before + 1
        proxy.close()
        assert sock.recv(1) == b""
        assert frozen.recv(1) == b""
    assert len(proxy_threads()) == before
    assert not proxy.running
    assert echo_server.wait_outcomes(2) == ["eof", "eof"]
    with pytest.raises(RuntimeError, match="not running"):
        proxy.cut()
    with pytest.raises(RuntimeError, match="only be started once"):
        proxy.start()


def test_bad_arguments_are_rejected(echo_server: EchoServer) -> None:
    """Invalid ports, latencies, idle timeouts and trigger actions raise ValueError."""
    with pytest.raises(ValueError, match="ports"):
        ChaosProxy("127.0.0.1", 0)
    proxy = ChaosProxy("127.0.0.1", echo_server.port)
    with pytest.raises(RuntimeError, match="no port until"):
        _ = proxy.port
    with pytest.raises(RuntimeError, match="not running"):
        proxy.cut()
    assert proxy.dsn is None
    with proxy:
        with pytest.raises(ValueError, match="latency"):
            proxy.set_latency(-1)
        with pytest.raises(ValueError, match="idle"):
            proxy.idle_cut(0)
        with pytest.raises(ValueError, match="action"):
            proxy.on_client_message(b"X", "explode")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_async_context_manager_and_trigger_wait(echo_server: EchoServer) -> None:
    """`async with` starts and stops the proxy; Trigger.wait() waits without blocking the loop."""
    async with ChaosProxy("127.0.0.1", echo_server.port) as proxy:
        trigger = proxy.on_client_message(b"ping", "freeze_after")
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping")
        await trigger.wait(3)
        proxy.thaw()
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
        with pytest.raises(TimeoutError):
            await proxy.on_client_message(b"never", "cut_before").wait(0.05)
    assert not proxy.running


def test_for_server_dsn_goes_through_the_proxy(pg: PostgresServer) -> None:
    """for_server() sets a verify-full DSN through the proxy, in both modes, once started."""
    for tls in (False, True):
        proxy = ChaosProxy.for_server(pg, tls=tls)
        assert proxy.dsn is None
        with proxy:
            assert proxy.dsn is not None
            assert f"port={proxy.port}" in proxy.dsn
            assert "sslmode=verify-full" in proxy.dsn
            with psycopg.connect(proxy.dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                assert conn.pgconn.ssl_in_use
                assert [c.tls for c in proxy.connections] == [tls]
            assert proxy.stats.accepted == 1
