"""PostgresServer, the throwaway TLS server of the test bed, against real PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import psycopg
import psycopg.errors
import pytest
from psycopg.conninfo import conninfo_to_dict

from aiopg_resilient.testing import (
    ChaosProxy,
    PostgresServer,
    ServerControlUnavailable,
    ServerUnavailable,
)
from aiopg_resilient.testing._backends import ENV_DSN
from aiopg_resilient.testing._discovery import ENV_BINDIR, _docker_usable

needs_control = pytest.mark.skipif(
    bool(os.environ.get(ENV_DSN)), reason=f"{ENV_DSN} names a server we cannot control"
)


def _without_backends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide every backend: no env DSN, an empty bindir override, a PATH with nothing in it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv(ENV_DSN, raising=False)
    monkeypatch.setenv(ENV_BINDIR, str(empty))
    monkeypatch.setenv("PATH", str(empty))
    return empty


@pytest.mark.asyncio
async def test_verify_full_dsn_gets_a_tls_session(pg: PostgresServer) -> None:
    """The DSN connects with sslmode=verify-full, and the server sees our backend on TLS."""
    assert pg.ssl
    assert conninfo_to_dict(pg.dsn)["sslmode"] == "verify-full"
    async with await psycopg.AsyncConnection.connect(pg.dsn) as conn:
        cur = await conn.execute("SHOW ssl")
        assert await cur.fetchone() == ("on",)
        cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert await cur.fetchone() == (True,)


@needs_control
@pytest.mark.asyncio
async def test_async_start_is_quick_and_does_not_block_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fresh server starts in about a second, the event loop keeps running meanwhile."""
    caplog.set_level(logging.INFO, logger="aiopg_resilient.testing")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        started = time.monotonic()
        async with PostgresServer() as server:
            elapsed = time.monotonic() - started
            print(f"PostgresServer started in {elapsed:.2f} s")
            assert elapsed < 15
            assert ticks > 10
            assert server.running
            rows = await server.execute("SELECT 1")
            assert rows == [(1,)]
            password = server.password
        tg.cancel_scope.cancel()
    assert password not in caplog.text
    assert not server.running


@needs_control
@pytest.mark.asyncio
async def test_restart_fast_kills_held_connections_and_keeps_the_port(
    pg: PostgresServer,
) -> None:
    """restart("fast") makes a held connection fail with AdminShutdown; new ones work."""
    port = pg.port
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as held:
        await held.execute("SELECT 1")
        await pg.restart("fast")
        with pytest.raises(psycopg.errors.AdminShutdown):
            await held.execute("SELECT 1")
    assert pg.running
    assert pg.port == port
    async with await psycopg.AsyncConnection.connect(pg.dsn) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


@needs_control
@pytest.mark.asyncio
async def test_stop_immediate_refuses_connections_until_start(pg: PostgresServer) -> None:
    """After stop("immediate") connecting is refused; start() brings the server back."""
    try:
        await pg.stop("immediate")
        await pg.stop("immediate")  # a no-op when stopped
        assert not pg.running
        with pytest.raises(psycopg.OperationalError, match=r"(?i)connection refused"):
            await psycopg.AsyncConnection.connect(pg.conninfo(connect_timeout=5))
    finally:
        await pg.start()
    await pg.start()  # a no-op when running
    assert pg.running
    async with await psycopg.AsyncConnection.connect(pg.dsn) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


@needs_control
@pytest.mark.asyncio
async def test_smart_stop_escalates_when_clients_stay(pg: PostgresServer) -> None:
    """stop("smart") with a client that never leaves escalates after its timeout."""
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as held:
        try:
            started = time.monotonic()
            await pg.stop("smart", timeout=0.5)
            assert not pg.running
            assert time.monotonic() - started < 10
        finally:
            await pg.start()
        with pytest.raises(psycopg.OperationalError):
            await held.execute("SELECT 1")


@pytest.mark.asyncio
async def test_terminate_backends_by_application_name(pg: PostgresServer) -> None:
    """terminate_backends(application_name=...) kills the matching connection only."""
    victim_dsn = pg.conninfo(application_name="ts-victim")
    bystander_dsn = pg.conninfo(application_name="ts-bystander")
    async with (
        await psycopg.AsyncConnection.connect(victim_dsn, autocommit=True) as victim,
        await psycopg.AsyncConnection.connect(bystander_dsn, autocommit=True) as bystander,
    ):
        assert await pg.terminate_backends(application_name="ts-victim") == 1
        with pytest.raises(psycopg.errors.AdminShutdown):
            await victim.execute("SELECT 1")
        cur = await bystander.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        assert await pg.terminate_backends(application_name="ts-nobody") == 0


def test_wrong_password_is_rejected(pg: PostgresServer) -> None:
    """A wrong password fails at once with "password authentication failed"."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.conninfo(password="wrong"))


def test_conninfo_overrides_keys(pg: PostgresServer) -> None:
    """conninfo() replaces and adds keys, keeps the rest, and None removes a key."""
    params = conninfo_to_dict(
        pg.conninfo(host="example.test", port=6543, application_name="x", sslrootcert=None)
    )
    assert params["host"] == "example.test"
    assert params["port"] == "6543"
    assert params["application_name"] == "x"
    assert params["password"] == pg.password
    assert params["sslmode"] == "verify-full"
    assert "sslrootcert" not in params


def test_proxy_ssl_contexts_trust_each_other(pg: PostgresServer) -> None:
    """The proxy's server-side context presents a cert its client-side context accepts."""
    server_side, client_side = pg.proxy_ssl_contexts()
    errors: list[BaseException] = []
    left, right = socket.socketpair()

    def serve() -> None:
        try:
            with server_side.wrap_socket(right, server_side=True) as tls:
                tls.sendall(b"ok")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_side.wrap_socket(left, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(10)
        left.close()
        right.close()
    assert errors == []
    assert client_side.verify_mode == ssl.CERT_REQUIRED


def test_markers_follow_fixture_use(pg: PostgresServer, request: pytest.FixtureRequest) -> None:
    """A test using the pg fixture is marked postgres (so -m can deselect it)."""
    assert request.node.get_closest_marker("postgres") is not None
    assert request.node.get_closest_marker("chaos") is None


@pytest.mark.asyncio
async def test_proxy_fixtures_reach_the_server(
    chaos_proxy: ChaosProxy, tls_chaos_proxy: ChaosProxy, request: pytest.FixtureRequest
) -> None:
    """chaos_proxy and tls_chaos_proxy are started, marked chaos, and their DSNs connect."""
    assert request.node.get_closest_marker("chaos") is not None
    for proxy in (chaos_proxy, tls_chaos_proxy):
        assert proxy.dsn is not None
        async with await psycopg.AsyncConnection.connect(proxy.dsn) as conn:
            cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert await cur.fetchone() == (True,)


def test_password_is_not_in_repr(pg: PostgresServer) -> None:
    """repr() shows backend, host and port, never the password."""
    text = repr(pg)
    assert pg.password not in text
    assert pg.backend in text
    assert str(pg.port) in text


@needs_control
def test_server_without_ssl_refuses_sslmode_require() -> None:
    """With ssl=False, sslmode=require fails about SSL; closing leaves no process or files."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with PostgresServer(ssl=False, port=port) as server:
        assert server.port == port
        assert not server.ssl
        assert server.ca_path is None
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SHOW ssl").fetchone() == ("off",)
        with pytest.raises(psycopg.OperationalError, match="SSL"):
            psycopg.connect(server.conninfo(sslmode="require"))
        with pytest.raises(RuntimeError, match="ssl=True"):
            server.proxy_ssl_contexts()
        data_dir = server.data_dir
        assert data_dir is not None
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    assert not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.asyncio
async def test_env_backend_runs_queries_but_cannot_control(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With AIOPG_RESILIENT_TEST_DSN set, queries work and restart() is refused clearly."""
    monkeypatch.setenv(ENV_DSN, pg.dsn)
    async with PostgresServer() as server:
        assert server.backend == "env"
        assert server.running
        assert server.port == pg.port
        assert server.password not in repr(server)
        assert await server.execute("SELECT current_user") == [("postgres",)]
        with pytest.raises(ServerControlUnavailable, match="local or docker backend"):
            await server.restart()
        with pytest.raises(ServerControlUnavailable):
            await server.stop()
        with pytest.raises(ServerControlUnavailable):
            server.proxy_ssl_contexts()
    assert pg.running


def test_no_binaries_raises_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """backend="local" without server binaries raises ServerUnavailable with the install hint."""
    _without_backends(monkeypatch, tmp_path)
    with pytest.raises(ServerUnavailable) as info:
        PostgresServer(backend="local").open_sync()
    message = str(info.value)
    assert ENV_BINDIR in message
    assert "apt-get install postgresql" in message
    assert ENV_DSN in message
    assert "aiopg-resilient[docker]" in message


def test_auto_skips_docker_without_an_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A docker CLI whose `docker info` fails is not picked; one that works is detected."""
    empty = _without_backends(monkeypatch, tmp_path)
    fake_site = tmp_path / "site"
    (fake_site / "testcontainers").mkdir(parents=True)
    (fake_site / "testcontainers" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(fake_site))
    docker = empty / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    assert not _docker_usable()
    with pytest.raises(ServerUnavailable, match="Docker with testcontainers is not usable"):
        PostgresServer().open_sync()
    docker.write_text("#!/bin/sh\nexit 0\n")
    assert _docker_usable()


def test_constructor_validates_its_arguments() -> None:
    """Bad backend, port or settings fail at construction, before anything starts."""
    with pytest.raises(ValueError, match="backend"):
        PostgresServer(backend="podman")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        PostgresServer(port=70000)
    with pytest.raises(ValueError, match="setting name"):
        PostgresServer(settings={"ssl = off\nfsync": "on"})
    with pytest.raises(ValueError, match="one-line"):
        PostgresServer(settings={"application_name": "a\nb"})
    server = PostgresServer()
    assert "not open" in repr(server)
    with pytest.raises(RuntimeError, match="not open"):
        server.dsn  # noqa: B018


# Run in a subreaper, so that what the killed process leaves behind is reparented to it and
# reaped: it exits only when every descendant is gone (or kills them after a deadline).
_REAPER = r"""
import ctypes, json, os, signal, subprocess, sys, time
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
victim = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE)
root = victim.stdout.readline().decode().strip()
os.kill(victim.pid, signal.SIGKILL)
deadline = time.monotonic() + 5
left = []
while True:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0 and time.monotonic() > deadline:
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if entry.isdigit() and fields[1] == me:
                left.append(int(entry))
                os.kill(int(entry), signal.SIGKILL)
        deadline = float("inf")
    elif pid == 0:
        time.sleep(0.05)
print(json.dumps({"root": root, "left": left, "root_exists": os.path.exists(root)}))
"""
_VICTIM = (
    "from aiopg_resilient.testing import PostgresServer\n"
    "server = PostgresServer(ssl=False)\n"
    "server.open_sync()\n"
    "assert server.data_dir is not None\n"
    "print(server.data_dir.parent, flush=True)\n"
    "import time; time.sleep(60)\n"
)


@needs_control
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux subreaper")
def test_killed_owner_leaves_no_server_behind() -> None:
    """When the process that started a server is SIGKILLed, its watchdog removes everything."""
    out = subprocess.run(
        [sys.executable, "-c", _REAPER, _VICTIM],
        capture_output=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["root"].startswith(os.sep)
    assert result["left"] == []
    assert not result["root_exists"]


_STANDBY_VICTIM = (
    "from aiopg_resilient.testing import PostgresServer\n"
    "server = PostgresServer(ssl=False)\n"
    "server.open_sync()\n"
    "standby = server.start_standby_sync()\n"
    "assert standby.data_dir is not None\n"
    "print(standby.data_dir.parent, flush=True)\n"
    "import time; time.sleep(60)\n"
)


@needs_control
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux subreaper")
def test_killed_owner_leaves_no_standby_behind() -> None:
    """When the owner of a primary and its standby is SIGKILLed, both servers are gone and
    the standby's directory is removed, by their watchdogs."""
    out = subprocess.run(
        [sys.executable, "-c", _REAPER, _STANDBY_VICTIM],
        capture_output=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    assert "standby" in result["root"]
    assert result["left"] == []
    assert not result["root_exists"]
