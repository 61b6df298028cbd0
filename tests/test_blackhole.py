"""A real blackhole: the network silently drops every packet, and only TCP can tell.

The library sets libpq's keepalives (10 s idle, then 3 probes 5 s apart) and
tcp_user_timeout (20 s) on every connection (see `aiopg_resilient._conninfo`). These tests
check on a real kernel that they end an idle connection and an in-flight query within those
bounds when packets are dropped, not refused (no FIN, RST or ICMP ever arrives).

Topology (no packet leaves the machine)::

    root namespace                                    namespace aiopgr-<pid>x<n>
    PostgresServer 127.0.0.1  <-  ChaosProxy  <-  veth pair 10.231.x.y/30  <-  client process
                                  (host end)       nft netdev ingress drop      (this file
                                                   on both ends                 run as a script)

The client runs in the namespace (``ip netns exec``) and connects the way the pool does:
the user's DSN (TLS verify-full, ``host=127.0.0.1 hostaddr=<proxy>``) with the library's
defaults applied by `aiopg_resilient._conninfo.apply_defaults`, and tells idle connections
from dead ones with `aiopg_resilient._liveness.looks_alive`, the pool's zero-round-trip
check at checkout. The test process drops the packets and compares the client's timings
(both sides read the same CLOCK_MONOTONIC) with the bounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from aiopg_resilient.testing import ChaosProxy, PostgresServer
from aiopg_resilient.testing._netns import VethNamespace, unavailable

_SLACK = 5.0
"""Allowed on top of each bound: timer granularity, scheduling, a loaded CI machine."""
_NOT_BEFORE = 8.0
"""No case may end sooner: it would not be the timeout that ended it."""
_IDLE_BOUND = 10 + 5 * 3  # keepalives_idle + keepalives_interval * keepalives_count
_USER_TIMEOUT = 20.0  # tcp_user_timeout
_CONNECT_TIMEOUT = 5.0
_IN_FLIGHT_SLEEP = 3.0
"""The query in flight when the drop starts would answer this long after it was sent."""
_LATE = 12.0
"""When, after the drop, a query goes out on a connection that still looks alive."""
_RESULT_WAIT = 50.0
"""How long after the drop the test waits for the client's results."""
_LIBPQ_DEFAULT_SOCKOPTS = {
    "SO_KEEPALIVE": 1,
    "TCP_KEEPIDLE": 10,
    "TCP_KEEPINTVL": 5,
    "TCP_KEEPCNT": 3,
    "TCP_USER_TIMEOUT": 20000,
}


# --- the client, run inside the namespace --------------------------------------------------


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def _sockopts(conn: Any) -> dict[str, int]:
    """The TCP options libpq set on *conn*'s socket."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        tcp = socket.IPPROTO_TCP
        return {
            "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "TCP_KEEPIDLE": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
            "TCP_KEEPINTVL": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
            "TCP_KEEPCNT": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
            "TCP_USER_TIMEOUT": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
        }


def _failure(exc: BaseException) -> dict[str, Any]:
    from aiopg_resilient import classify

    return {
        "error": f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}".strip(),
        "failure": classify(exc).name,
    }


async def _client(dsn: str) -> None:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from aiopg_resilient._conninfo import apply_defaults
    from aiopg_resilient._liveness import looks_alive

    def conninfo(case: str, **overrides: Any) -> str:
        # What the pool connects with: the user's DSN, then the library's defaults.
        return apply_defaults(
            make_conninfo(dsn, **overrides), None, application_name=f"blackhole-{case}"
        )

    last_rx: dict[str, float] = {}

    async def connect(case: str, **overrides: Any) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(conninfo(case, **overrides), autocommit=True)
        await conn.execute("SELECT 1")
        last_rx[case] = time.monotonic()
        return conn

    idle = await connect("idle")
    # The control: keepalives alone, without tcp_user_timeout (set by the user, so kept).
    keepalive_only = await connect("idle_keepalive_only", tcp_user_timeout=0)
    sent_after = await connect("query_sent_after_drop")
    late = await connect("query_sent_late")
    in_flight = await connect("query_in_flight_at_drop")
    in_flight_query = asyncio.ensure_future(
        in_flight.execute(f"SELECT pg_sleep({_IN_FLIGHT_SLEEP})")
    )
    last_rx["query_in_flight_at_drop"] = time.monotonic()  # + the ACK, a millisecond later
    await asyncio.sleep(0.3)  # on the wire and acknowledged: now only the answer is awaited
    _emit(
        event="ready",
        sockopts={"defaults": _sockopts(idle), "keepalive_only": _sockopts(keepalive_only)},
    )

    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    drop_at = float(json.loads(line)["drop_at"])

    async def watch_idle(case: str, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        # What a checkout would see, checked every 50 ms: is the idle connection alive?
        while looks_alive(conn):
            if time.monotonic() - drop_at > _RESULT_WAIT:
                return {"detected": False}
            await asyncio.sleep(0.05)
        result: dict[str, Any] = {
            "detected": True,
            "after_drop": time.monotonic() - drop_at,
            "after_last_rx": time.monotonic() - last_rx[case],
            "libpq_error": conn.pgconn.error_message.decode(errors="replace").strip(),
        }
        try:
            await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            result.update(_failure(exc))
        else:
            result["error"] = "none: the next query succeeded"
        return result

    async def query_after_drop() -> dict[str, Any]:
        sent = time.monotonic()
        try:
            await sent_after.execute("SELECT pg_sleep(0)")
        except psycopg.Error as exc:
            now = time.monotonic()
            return {"after_drop": now - drop_at, "after_send": now - sent, **_failure(exc)}
        return {"after_drop": time.monotonic() - drop_at, "error": None}

    async def query_sent_late() -> dict[str, Any]:
        # A checkout _LATE s into the outage: the connection still looks alive, so the
        # query goes out, and tcp_user_timeout counts from now, not from the outage.
        await asyncio.sleep(drop_at + _LATE - time.monotonic())
        looked_alive = looks_alive(late)
        sent = time.monotonic()
        try:
            await late.execute("SELECT 1")
        except psycopg.Error as exc:
            now = time.monotonic()
            return {
                "looked_alive": looked_alive,
                "after_drop": now - drop_at,
                "after_send": now - sent,
                **_failure(exc),
            }
        return {"after_drop": time.monotonic() - drop_at, "error": None}

    async def query_in_flight() -> dict[str, Any]:
        try:
            await in_flight_query
        except psycopg.Error as exc:
            now = time.monotonic()
            return {
                "after_drop": now - drop_at,
                "after_last_rx": now - last_rx["query_in_flight_at_drop"],
                **_failure(exc),
            }
        return {"after_drop": time.monotonic() - drop_at, "error": None}

    async def connect_after_drop() -> dict[str, Any]:
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo("connect_after_drop"))
        except psycopg.Error as exc:
            return {"after_drop": time.monotonic() - drop_at, **_failure(exc)}
        await conn.close()
        return {"after_drop": time.monotonic() - drop_at, "error": None}

    names = (
        "idle",
        "idle_keepalive_only",
        "query_sent_after_drop",
        "query_sent_late",
        "query_in_flight_at_drop",
        "connect_after_drop",
    )
    results = await asyncio.gather(
        watch_idle("idle", idle),
        watch_idle("idle_keepalive_only", keepalive_only),
        query_after_drop(),
        query_sent_late(),
        query_in_flight(),
        connect_after_drop(),
    )
    _emit(event="results", cases=dict(zip(names, results, strict=True)))
    for conn in (idle, keepalive_only, sent_after, late, in_flight):
        await conn.close()


def _client_main() -> None:
    # The DSN (with the test server's password) comes on stdin, not on the command line.
    config = json.loads(sys.stdin.readline())
    asyncio.run(_client(config["dsn"]))


# --- the tests -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def netns_usable() -> None:
    """Skip, saying why, where namespaces cannot be made (before a server is started)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"a real blackhole needs network namespaces: {reason}")


@pytest.fixture
def netns(netns_usable: None) -> Iterator[VethNamespace]:
    with VethNamespace() as ns:
        yield ns


class _Client:
    """The client script in the namespace, read line by line (JSON events)."""

    def __init__(self, argv: list[str], dsn: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(dsn=dsn)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, **message: Any) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def event(self, name: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {name!r} from the client in time; stderr:\n{self.stderr()}")
            if line is None:
                pytest.fail(f"the client exited before {name!r}; stderr:\n{self.stderr()}")
            if line.startswith("{"):
                event: dict[str, Any] = json.loads(line)
                if event.get("event") == name:
                    return event

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-4000:]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(10)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


def _within(case: str, result: dict[str, Any], low: float, high: float) -> None:
    elapsed = result.get("after_drop")
    assert elapsed is not None, f"{case}: {result}"
    assert low <= elapsed <= high, (
        f"{case}: ended {elapsed} s after the drop, not within [{low}, {high}] s: {result}"
    )


@pytest.mark.slow
def test_timeouts_end_idle_and_in_flight_connections_in_a_blackhole(
    netns: VethNamespace, pg: PostgresServer
) -> None:
    # Pass-through: the client's TLS goes end to end, verified against 127.0.0.1 (hostaddr
    # only says where to connect), so the client keeps sslmode=verify-full.
    with ChaosProxy(pg.host, pg.port, listen_host=netns.host_address) as proxy:
        dsn = pg.conninfo(hostaddr=proxy.host, port=proxy.port)
        client = _Client(netns.command(sys.executable, str(Path(__file__).resolve())), dsn)
        try:
            ready = client.event("ready", time.monotonic() + 30)
            netns.blackhole()
            drop_at = time.monotonic()
            client.send(drop_at=drop_at)
            results = client.event("results", drop_at + _RESULT_WAIT + 10)["cases"]
            dropped = netns.dropped()
        finally:
            netns.restore()
            client.close()
            proxy.reset()  # the proxy's own retransmissions stop here

    print(json.dumps({"sockopts": ready["sockopts"], "dropped": dropped, **results}, indent=2))
    assert ready["sockopts"]["defaults"] == _LIBPQ_DEFAULT_SOCKOPTS
    assert ready["sockopts"]["keepalive_only"] == {**_LIBPQ_DEFAULT_SOCKOPTS, "TCP_USER_TIMEOUT": 0}
    assert dropped > 0

    # Idle: keepalives say 10 + 3 * 5 = 25 s. On Linux TCP_USER_TIMEOUT also bounds
    # keepalive probing (the connection dies once 20 s pass without an answer, after the
    # first unanswered probe), so the defaults end it sooner than that.
    idle = results["idle"]
    assert idle["detected"], idle
    _within("idle", idle, _NOT_BEFORE, _IDLE_BOUND + _SLACK)
    assert idle["failure"] == "CONNECTION", idle

    # A query sent into the blackhole: its data is never acknowledged, tcp_user_timeout.
    sent = results["query_sent_after_drop"]
    _within("query sent after the drop", sent, _NOT_BEFORE, _USER_TIMEOUT + _SLACK)
    assert sent["failure"] == "CONNECTION", sent

    # A query already sent and acknowledged when the drop started: the client only waits
    # for the answer, nothing of its own is unacknowledged, so it is the keepalive (with
    # the user timeout) that ends it.
    in_flight = results["query_in_flight_at_drop"]
    _within("query in flight at the drop", in_flight, _NOT_BEFORE, _USER_TIMEOUT + _SLACK)
    assert in_flight["failure"] == "CONNECTION", in_flight

    # The gap: a connection checked out before the kernel gave up on it still looks alive,
    # and the query sent on it gets the whole tcp_user_timeout from when it was sent.
    late = results["query_sent_late"]
    assert late["looked_alive"], late
    assert _NOT_BEFORE <= late["after_send"] <= _USER_TIMEOUT + _SLACK, late
    assert late["failure"] == "CONNECTION", late

    # The control: keepalives alone take the whole 25 s, so it was the user timeout that
    # ended the idle connection above sooner.
    control = results["idle_keepalive_only"]
    assert control["detected"], control
    _within("idle, keepalives only", control, _USER_TIMEOUT + 1, _IDLE_BOUND + _SLACK)
    assert idle["after_drop"] < control["after_drop"] - 3, (idle, control)

    # And a new connection into the blackhole gives up after connect_timeout.
    connect = results["connect_after_drop"]
    _within("connect", connect, _CONNECT_TIMEOUT - 0.5, _CONNECT_TIMEOUT + _SLACK)
    assert connect["failure"] == "CONNECTION", connect


def test_the_blackhole_drops_and_restore_delivers_again(netns: VethNamespace) -> None:
    # A listener at the root end; a client in the namespace connects through the pair.
    with socket.create_server((netns.host_address, 0)) as server:
        port = server.getsockname()[1]
        probe = (
            "import socket, sys\n"
            "try:\n"
            f"    socket.create_connection(({netns.host_address!r}, {port}), timeout=1).close()\n"
            "except OSError as exc:\n"
            "    sys.exit(f'no connection: {exc}')\n"
        )
        argv = netns.command(sys.executable, "-c", probe)

        def connects() -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)

        first = connects()
        assert first.returncode == 0, first.stderr
        netns.blackhole()
        blocked = connects()
        assert blocked.returncode != 0
        assert "timed out" in blocked.stderr  # dropped: not refused, not unreachable
        assert netns.dropped() > 0
        netns.restore()
        again = connects()
        assert again.returncode == 0, again.stderr
    netns.close()
    assert not Path("/run/netns", netns.name).exists()
    assert not Path("/sys/class/net", netns.host_ifname).exists()


if __name__ == "__main__":
    _client_main()
