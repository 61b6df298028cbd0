"""The aiohttp integration (`aiopg_resilient.integrations.aiohttp`) and its example service.

In-process (aiohttp's TestServer/TestClient, or an AppRunner on loopback): each error of
the layer becomes its HTTP answer (503 + Retry-After, or 500 with the transaction id), a
database that is down costs a request its retry budget and no more, readiness follows
the pool, liveness does not, and the pool is closed only after aiohttp's graceful
shutdown let the requests in flight finish.

Under fire (slow): examples/aiohttp_app.py in a subprocess, 16 HTTP clients reading and
writing through a TLS-terminating proxy while the test cuts the proxy's sessions,
terminates the backends, restarts the server and crashes it; then SIGTERM while writes
are in flight. The same workload runs against psycopg_pool used the documented way in
aiohttp (the small app below, run as ``python -m tests.test_aiohttp_app``) under the same
faults, for the figures only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from aiopg_resilient import PoolTimeout, ResilientPool, RetryPolicy
from aiopg_resilient.integrations.aiohttp import (
    POOL_KEY,
    error_middleware,
    get_pool,
    health_routes,
    pool_ctx,
)
from aiopg_resilient.testing import ChaosProxy, PostgresServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "aiohttp_app.py"


def _free_port() -> int:
    """A loopback port nothing listens on (a connect to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _routes(table: str = "unused") -> list[web.RouteDef]:
    """Handlers that each go through one path of the pool."""

    async def read(request: web.Request) -> web.Response:
        return web.json_response({"value": await get_pool(request).fetchval("SELECT 1")})

    async def write(request: web.Request) -> web.Response:
        sql = f"INSERT INTO {table} VALUES (%s, 1)"
        n = await get_pool(request).execute(sql, (request.query.get("k", "k"),))
        return web.json_response({"written": n})

    async def block(request: web.Request) -> web.Response:
        async with get_pool(request).transaction() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES ('block', 1)")
            await conn.execute("SELECT pg_sleep(%s)", (float(request.query.get("s", 0)),))
        return web.json_response({"written": 1})

    async def sleep(request: web.Request) -> web.Response:
        await get_pool(request).fetchval("SELECT pg_sleep(%s)", (float(request.query["s"]),))
        return web.json_response({"slept": True})

    async def broken(request: web.Request) -> web.Response:
        await get_pool(request).fetchval("SELECT 1 / 0")  # a SQL error: not the layer's
        raise AssertionError("unreachable")

    return [
        web.get("/read", read),
        web.post("/write", write),
        web.post("/block", block),
        web.get("/sleep", sleep),
        web.get("/broken", broken),
        *health_routes(),
    ]


@contextlib.asynccontextmanager
async def _client(
    dsn_or_pool: str | ResilientPool, table: str = "unused", **kwargs: Any
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application(middlewares=[error_middleware])
    app.cleanup_ctx.append(pool_ctx(dsn_or_pool, **kwargs))
    app.add_routes(_routes(table))
    async with TestClient(TestServer(app)) as client:
        yield client


async def _answer(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON body of an answer of the layer's; never a traceback."""
    text = await resp.text()
    assert "Traceback" not in text
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    return body


# -- in-process ------------------------------------------------------------------------


async def test_database_down_is_503_within_the_budget() -> None:
    """Nothing listens: reads, writes and blocks answer 503 + Retry-After + JSON after
    the retry budget (1 s), never a hang; readiness 503, liveness 200."""
    dsn = f"host=127.0.0.1 port={_free_port()} dbname=app user=app connect_timeout=2"
    with anyio.fail_after(15):
        async with _client(dsn, retry=RetryPolicy(timeout=1.0), name="down") as client:
            for method, path in [("GET", "/read"), ("POST", "/write"), ("POST", "/block")]:
                started = time.monotonic()
                resp = await client.request(method, path)
                elapsed = time.monotonic() - started
                assert resp.status == 503, (path, await resp.text())
                assert resp.headers["Retry-After"] == "1"
                body = await _answer(resp)
                assert body["error"] == "database_unavailable"
                assert body["retry"] is True
                assert 0.5 < elapsed < 3.0, (path, elapsed)
            resp = await client.get("/health/ready")
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await _answer(resp))["ready"] is False
            resp = await client.get("/health/live")
            assert resp.status == 200
            assert await resp.json() == {"alive": True}


async def test_startup_waits_for_the_pool() -> None:
    """pool_ctx(wait=True) against a database that does not answer: the application does
    not start (PoolTimeout after *timeout*), and the pool is closed."""
    dsn = f"host=127.0.0.1 port={_free_port()} dbname=app user=app connect_timeout=2"
    pool = ResilientPool(dsn, name="down")
    app = web.Application()
    app.cleanup_ctx.append(pool_ctx(pool, wait=True, timeout=0.5))
    with anyio.fail_after(10), pytest.raises(PoolTimeout):
        async with TestServer(app):
            pass
    assert pool.closed


async def test_busy_pool_is_503_and_sql_errors_pass(pg: PostgresServer, app_name: str) -> None:
    """Every connection busy for acquire_timeout: 503 database_busy + Retry-After. A SQL
    error is not the layer's to answer: aiohttp's own 500, not a layer JSON body."""
    with anyio.fail_after(15):
        async with _client(
            pg.dsn, name=app_name, min_size=1, max_size=1, acquire_timeout=0.3, wait=True
        ) as client:

            async def hold() -> None:
                async with client.get("/sleep?s=1.5") as resp:
                    assert resp.status == 200

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                await anyio.sleep(0.3)
                resp = await client.get("/read")
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert (await _answer(resp))["error"] == "database_busy"
            resp = await client.get("/read")
            assert resp.status == 200
            assert await resp.json() == {"value": 1}
            resp = await client.get("/broken")
            assert resp.status == 500
            assert resp.content_type != "application/json"
            assert "Traceback" not in await resp.text()


async def test_connection_lost_in_a_block_is_503(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """A backend terminated inside transaction(): 503 connection_lost, nothing applied."""
    with anyio.fail_after(15):
        async with _client(pg.dsn, table, name=app_name, wait=True) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_terminate_when_sleeping, pg, app_name)
                resp = await client.post("/block?s=5")
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await _answer(resp))["error"] == "connection_lost"
    assert (await pg.execute(f"SELECT count(*) FROM {table}"))[0][0] == 0


async def _sleeping(pg: PostgresServer, app_name: str) -> int:
    """How many backends of *app_name* are running a pg_sleep."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'"
    )
    return int((await pg.execute(sql, (app_name,)))[0][0])


async def _terminate_when_sleeping(pg: PostgresServer, app_name: str) -> None:
    while await _sleeping(pg, app_name) == 0:
        await anyio.sleep(0.02)
    await pg.terminate_backends(application_name=app_name)


async def test_commit_unknown_is_500_with_the_xid(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """A COMMIT whose answer is lost (in_doubt="raise"): 500 commit_unknown carrying the
    id of the transaction that wrote the row, and no retry advice."""
    assert tls_chaos_proxy.dsn is not None
    with anyio.fail_after(15):
        async with _client(
            tls_chaos_proxy.dsn, table, name=app_name, in_doubt="raise", wait=True
        ) as client:
            assert (await client.get("/read")).status == 200
            tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
            resp = await client.post("/write?k=doubt")
            assert resp.status == 500
            assert "Retry-After" not in resp.headers
            body = await _answer(resp)
    assert body["error"] == "commit_unknown"
    assert body["retry"] is False
    (xmin,) = (await pg.execute(f"SELECT xmin::text::bigint FROM {table} WHERE k = 'doubt'"))[0]
    assert body["transaction_id"] % 2**32 == xmin  # the row's writer (the server committed)


async def test_readiness_liveness_and_pool_lifecycle(pg: PostgresServer, app_name: str) -> None:
    """An open pool with a connection: ready 200; live 200. pool_ctx opens the pool it
    is given and closes it at cleanup; a pool with arguments, or bad arguments, is refused
    before the application starts."""
    pool = ResilientPool(pg.dsn, name=app_name)
    with anyio.fail_after(15):
        async with _client(pool, wait=True) as client:
            assert client.app is not None
            assert client.app[POOL_KEY] is pool
            resp = await client.get("/health/ready")
            assert resp.status == 200
            body = await resp.json()
            assert body["ready"] is True
            assert body["size"] >= 1
            assert (await client.get("/health/live")).status == 200
            assert not pool.closed
    assert pool.closed
    with pytest.raises(TypeError):
        pool_ctx(pool, max_size=2)
    with pytest.raises(ValueError, match="min_size"):
        pool_ctx(pg.dsn, min_size=-1)


async def test_no_pool_in_the_app() -> None:
    """Without pool_ctx: readiness 503 (not open), liveness 200, get_pool a clear error."""
    app = web.Application()
    app.add_routes(_routes())
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/health/ready")
        assert resp.status == 503
        assert (await _answer(resp))["detail"] == "the pool is not open"
        assert (await client.get("/health/live")).status == 200
        request = make_mocked_request("GET", "/", app=app)
        with pytest.raises(RuntimeError, match="pool_ctx"):
            get_pool(request)


async def test_pool_closed_after_graceful_shutdown(pg: PostgresServer, app_name: str) -> None:
    """Cleanup while a request is in flight: aiohttp lets it finish (200) on a live pool,
    then pool_ctx closes the pool."""
    app = web.Application(middlewares=[error_middleware])
    app.cleanup_ctx.append(pool_ctx(pg.dsn, name=app_name, wait=True))
    app.add_routes(_routes())
    runner = web.AppRunner(app, shutdown_timeout=10)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = app[POOL_KEY]
    answers: list[int] = []
    cleaned = False
    try:
        with anyio.fail_after(15):
            async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:

                async def slow() -> None:
                    async with session.get(f"http://127.0.0.1:{port}/sleep?s=0.7") as resp:
                        answers.append(resp.status)

                tg.start_soon(slow)
                while pool.stats.in_use == 0:
                    await anyio.sleep(0.01)
                cleaned = True
                await runner.cleanup()
                assert answers == [200]  # answered before cleanup returned
                assert pool.closed
    finally:
        if not cleaned:
            await runner.cleanup()


# -- under fire --------------------------------------------------------------------------

CLIENTS = 16
SECONDS = 9.5


async def _crash(pg: PostgresServer) -> None:
    """stop -m immediate (crash recovery at the next start), half a second down, start."""
    try:
        await pg.stop("immediate")
        await anyio.sleep(0.5)
    finally:
        with anyio.CancelScope(shield=True):
            await pg.start()


Fault = Callable[[PostgresServer, ChaosProxy, str], Awaitable[object]]
# (seconds into the run, name, fault); each fault's window lasts until the next one starts
FAULTS: list[tuple[float, str, Fault]] = [
    (1.0, "proxy cut (SSL closed unexpectedly)", lambda _, p, __: anyio.to_thread.run_sync(p.cut)),
    (2.5, "pg_terminate_backend", lambda pg, _, app: pg.terminate_backends(application_name=app)),
    (4.0, "restart -m fast", lambda pg, _, __: pg.restart("fast")),
    (5.5, "crash: stop -m immediate, start", lambda pg, _, __: _crash(pg)),
]


@dataclasses.dataclass
class Exchange:
    kind: str  # "read" or "write"
    key: str
    start: float
    end: float
    status: int | None  # None: no answer (the exchange failed)
    detail: str = ""


@dataclasses.dataclass
class Run:
    name: str
    exchanges: list[Exchange] = dataclasses.field(default_factory=list)
    windows: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    end: float = 0.0
    disconnects: int = 0
    stats_after: dict[str, Any] = dataclasses.field(default_factory=dict)
    stats_settled: dict[str, Any] = dataclasses.field(default_factory=dict)
    sleeping: int = -1  # backends still running a walked-away-from pg_sleep, once settled
    logged: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """The errors the service logged (the last line of each traceback)."""

    def rows(self) -> list[tuple[str, int, int, int, float, float]]:
        """Per window, the exchanges that ended in it (those the fault hit in flight
        included): (fault, requests, 5xx, failed exchanges, p99 ms, max ms)."""
        out = []
        bounds = [*self.windows, (math.inf, "")]
        for (t0, name), (t1, _) in itertools.pairwise(bounds):
            mine = [e for e in self.exchanges if t0 <= e.end < t1]
            lat = sorted(e.end - e.start for e in mine) or [0.0]
            p99 = lat[int(0.99 * (len(lat) - 1))] * 1000
            fives = sum(1 for e in mine if e.status is not None and e.status >= 500)
            failed = sum(1 for e in mine if e.status is None)
            out.append((name, len(mine), fives, failed, p99, lat[-1] * 1000))
        return out


async def _exchange(
    session: aiohttp.ClientSession, run: Run, kind: str, key: str, method: str, url: str
) -> Exchange:
    body = {"name": key, "qty": 1} if method == "POST" else None
    start = time.monotonic()
    try:
        async with session.request(method, url, json=body) as resp:
            text = await resp.text()
            ex = Exchange(kind, key, start, time.monotonic(), resp.status, text[:300])
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        ex = Exchange(kind, key, start, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
    run.exchanges.append(ex)
    return ex


async def _client_task(session: aiohttp.ClientSession, run: Run, n: int, t_end: float) -> None:
    rng = random.Random(n)
    i = 0
    while time.monotonic() < t_end:
        i += 1
        roll = rng.random()
        if roll < 0.35:
            await _exchange(session, run, "read", "", "GET", "/items?n=5")
        elif roll < 0.7:
            await _exchange(session, run, "read", "", "GET", "/items/1")
        else:
            await _exchange(session, run, "write", f"w-{n}-{i}", "POST", "/items")


async def _walking_away(base: str, run: Run, t_end: float) -> None:
    """Walk away from a slow request (pg_sleep(1)) after 0.2 s, again and again: the
    client closes its connection (a session of its own, no keep-alive), the example
    cancels the handler (handler_cancellation) and with it the query."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def slow() -> None:
            async with session.get("/slow?s=1") as resp:
                await resp.read()

        while time.monotonic() < t_end:
            # wait_for: a task of its own, so a cancellation the client turns into a
            # ClientError cannot leak into the test's cancel scopes.
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.wait_for(slow(), 0.2)
            run.disconnects += 1
            await anyio.sleep(0.1)


async def _faults(pg: PostgresServer, proxy: ChaosProxy, app_name: str, run: Run) -> None:
    t0 = run.windows[0][0]
    for offset, name, fault in FAULTS:
        await anyio.sleep(max(0.0, t0 + offset - time.monotonic()))
        run.windows.append((time.monotonic(), name))
        await fault(pg, proxy, app_name)


async def _stats(session: aiohttp.ClientSession) -> dict[str, Any]:
    async with session.get("/stats") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def _drive(base: str, pg: PostgresServer, proxy: ChaosProxy, app_name: str, run: Run) -> None:
    """The workload under the faults, then the pool's counts once the clients are gone."""
    timeout = aiohttp.ClientTimeout(total=20)
    connector = aiohttp.TCPConnector(limit=CLIENTS + 8)
    async with aiohttp.ClientSession(base, timeout=timeout, connector=connector) as session:
        seed = await _exchange(session, run, "write", "seed", "POST", "/items")
        assert seed.status == 201, seed
        run.exchanges.clear()
        run.windows.append((time.monotonic(), "steady"))
        t_end = run.windows[0][0] + SECONDS
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_faults, pg, proxy, app_name, run)
                for n in range(CLIENTS):
                    tg.start_soon(_client_task, session, run, n, t_end)
                for _ in range(2):
                    tg.start_soon(_walking_away, base, run, t_end)
        finally:
            if not pg.running:
                await pg.start()
        run.end = time.monotonic()
        run.stats_after = await _stats(session)
        with anyio.move_on_after(5):
            while True:
                run.stats_settled = await _stats(session)
                if run.stats_settled["in_use"] == 0 and run.stats_settled["waiting"] == 0:
                    break
                await anyio.sleep(0.05)
    with anyio.move_on_after(5):
        while True:
            run.sleeping = await _sleeping(pg, app_name)
            if run.sleeping == 0:
                break
            await anyio.sleep(0.05)


def _tail(log: Path) -> str:
    """The end of a service's output, for a failure message."""
    return log.read_text(errors="replace")[-3000:]


def _logged_errors(log: Path) -> collections.Counter[str]:
    """The exceptions that ended the tracebacks a service logged, by class and message."""
    lines = log.read_text(errors="replace").splitlines()
    return collections.Counter(
        line[:90] for line in lines if line.startswith("psycopg") and ": " in line
    )


@contextlib.asynccontextmanager
async def _service(
    command: list[str], dsn: str, log: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A service subprocess on a free loopback port, up (liveness 200) before it yields."""
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "HOST": "127.0.0.1", "PORT": str(port)}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=ROOT, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with anyio.fail_after(30):
            async with aiohttp.ClientSession(base) as session:
                while True:
                    assert proc.returncode is None, _tail(log)
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get("/health/ready") as resp:
                            if resp.status == 200:
                                break
                    await anyio.sleep(0.1)
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                with anyio.fail_after(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _graceful_shutdown(proc: asyncio.subprocess.Process, base: str, run: Run) -> float:
    """Writers posting when SIGTERM arrives; each stops at its first failed exchange.
    Returns when the signal was sent."""
    sent = 0.0

    async def writer(n: int) -> None:
        i = 0
        async with aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=20)) as s:
            while (await _exchange(s, run, "write", f"g-{n}-{i}", "POST", "/items")).status:
                i += 1

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(writer, n)
        await anyio.sleep(0.7)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(20):
        await proc.wait()
    return sent


async def _rows(pg: PostgresServer, schema: str) -> dict[str, int]:
    rows = await pg.execute(f"SELECT name, count(*) FROM {schema}.items GROUP BY name")
    return {name: int(n) for name, n in rows}


def _print_side_by_side(runs: list[Run]) -> None:
    head = " | ".join(f"{r.name:^39}" for r in runs)
    print(f"\naiohttp under fire: {CLIENTS} clients, {SECONDS} s, 65% reads 35% writes")
    print(f"{'window (fault)':38} | {head}")
    cols = f"{'requests':>8} {'5xx':>4} {'failed':>6} {'p99 ms':>8} {'max ms':>8}"
    sub = " | ".join(cols for _ in runs)
    print(f"{'':38} | {sub}")
    for i, (name, *_) in enumerate(runs[0].rows()):
        cells = []
        for r in runs:
            rows = r.rows()
            if i < len(rows):
                _, n, fives, failed, p99, top = rows[i]
                cells.append(f"{n:>8} {fives:>4} {failed:>6} {p99:>8.0f} {top:>8.0f}")
            else:
                cells.append(f"{'-':>39}")
        print(f"{name:38} | {' | '.join(cells)}")
    for r in runs:
        after = {k: r.stats_after.get(k) for k in ("size", "idle", "in_use", "waiting")}
        settled = {k: r.stats_settled.get(k) for k in ("size", "idle", "in_use", "waiting")}
        counters = {k: r.stats_after[k] for k in ("connects", "retries") if k in r.stats_after}
        print(
            f"{r.name}: {r.disconnects} clients walked away from /slow; pool right after "
            f"the load {after}, settled {settled}, pg_sleep backends left {r.sleeping}"
            f"{f'; {counters}' if counters else ''}; exception lines in its log {dict(r.logged)}"
        )


@pytest.mark.slow
async def test_example_under_fire(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, tmp_path: Path
) -> None:
    """examples/aiohttp_app.py through cuts, terminations, a restart and a crash: zero
    5xx and zero failed exchanges on reads; every acknowledged write applied exactly once,
    any 5xx a CommitUnknown 500; no connection leaked by clients that walked away; a
    SIGTERM while writes are in flight loses nothing acknowledged. psycopg_pool's
    figures under the same faults are printed alongside (not asserted)."""
    assert tls_chaos_proxy.dsn is not None
    ours, theirs = Run("aiopg_resilient"), Run("psycopg_pool")
    schemas = {run.name: f"{app_name}_{i}" for i, run in enumerate((ours, theirs))}
    for schema in schemas.values():
        await pg.execute(f"CREATE SCHEMA {schema}")
    try:
        with anyio.fail_after(100):
            dsn = make_conninfo(
                tls_chaos_proxy.dsn,
                application_name=app_name,
                options=f"-c search_path={schemas[ours.name]}",
            )
            command = [sys.executable, str(EXAMPLE)]
            async with _service(command, dsn, tmp_path / "ours.log") as (proc, base):
                await _drive(base, pg, tls_chaos_proxy, app_name, ours)
                shutdown = Run("shutdown")
                signalled = await _graceful_shutdown(proc, base, shutdown)
                assert proc.returncode == 0, _tail(tmp_path / "ours.log")
            ours.logged = _logged_errors(tmp_path / "ours.log")
            ours_rows = await _rows(pg, schemas[ours.name])
            try:
                dsn = make_conninfo(
                    tls_chaos_proxy.dsn,
                    application_name=f"{app_name}pp",
                    options=f"-c search_path={schemas[theirs.name]}",
                )
                command = [sys.executable, "-m", "tests.test_aiohttp_app"]
                async with _service(command, dsn, tmp_path / "theirs.log") as (_, base):
                    await _drive(base, pg, tls_chaos_proxy, f"{app_name}pp", theirs)
                theirs.logged = _logged_errors(tmp_path / "theirs.log")
            except Exception as exc:  # only figures: never fails the test
                print(f"\npsycopg_pool run failed: {type(exc).__name__}: {exc}")
            _print_side_by_side([ours, theirs] if theirs.end else [ours])
    finally:
        if not pg.running:
            await pg.start()
        for schema in schemas.values():
            await pg.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    reads = [e for e in ours.exchanges if e.kind == "read"]
    writes = [e for e in ours.exchanges if e.kind == "write"]
    bad_reads = [e for e in reads if e.status != 200]
    acked = [e for e in writes if e.status == 201]
    doubled = [k for k, n in ours_rows.items() if n > 1]
    lost = [e.key for e in acked if e.key not in ours_rows]
    unknown = [e for e in writes if e.status == 500 and "commit_unknown" in e.detail]
    other = [e for e in writes if e.status != 201 and e not in unknown]
    print(
        f"aiopg_resilient: {len(reads)} reads, {len(writes)} writes ({len(acked)} acknowledged, "
        f"CommitUnknown 500s: {len(unknown)}, of which applied "
        f"{sum(1 for e in unknown if e.key in ours_rows)}), listener {ours.stats_after['listener']}"
    )
    g_writes = [e for e in shutdown.exchanges if e.kind == "write"]
    g_acked = [e for e in g_writes if e.status == 201]
    in_flight = [e for e in g_writes if e.start < signalled < e.end]
    g_lost = [e.key for e in g_acked if e.key not in ours_rows]
    g_phantom = [e.key for e in g_writes if e.status is None and e.key in ours_rows]
    print(
        f"SIGTERM with writes in flight: {len(g_writes)} writes, {len(g_acked)} acknowledged, "
        f"{len(in_flight)} in flight at the signal "
        f"({sum(1 for e in in_flight if e.status == 201)} answered 201), "
        f"acknowledged but lost {g_lost}, "
        f"failed but applied {g_phantom}"
    )
    assert bad_reads == [], bad_reads[:5]
    assert other == [], other[:5]
    assert doubled == []
    assert lost == []
    assert ours.stats_settled["in_use"] == 0
    assert ours.stats_settled["waiting"] == 0
    assert ours.sleeping == 0
    assert ours.stats_after["listener"]["notifications"] > 0
    assert ours.stats_after["listener"]["reconnects"] >= 1
    assert in_flight, "no write was in flight at SIGTERM"
    assert g_lost == []


# -- psycopg_pool, the documented way (run as `python -m tests.test_aiohttp_app`) --------


def psycopg_pool_app(dsn: str) -> web.Application:
    """The same routes on psycopg_pool: AsyncConnectionPool opened in a cleanup_ctx,
    ``async with pool.connection()`` in handlers, errors left to aiohttp."""
    from psycopg_pool import AsyncConnectionPool

    key = web.AppKey("pool", AsyncConnectionPool)
    insert = """WITH new AS (INSERT INTO items (name, qty) VALUES (%s, %s) RETURNING id)
        SELECT pg_notify('items', id::text) FROM new"""

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(
            dsn, min_size=1, max_size=10, open=False, kwargs={"row_factory": dict_row}
        )
        await pool.open(wait=True)
        async with pool.connection() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, name text "
                "NOT NULL, qty int NOT NULL DEFAULT 0 CHECK (qty >= 0))"
            )
        app[key] = pool
        yield
        await pool.close()

    async def query(request: web.Request, sql: str, params: Any = None) -> list[Any]:
        async with request.app[key].connection() as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []

    async def list_items(request: web.Request) -> web.Response:
        total = (await query(request, "SELECT count(*) AS n FROM items"))[0]["n"]
        sql = "SELECT * FROM items ORDER BY id DESC LIMIT %s"
        rows = await query(request, sql, (int(request.query.get("n", 20)),))
        return web.json_response({"total": total, "items": rows})

    async def get_item(request: web.Request) -> web.Response:
        sql = "SELECT * FROM items WHERE id = %s"
        rows = await query(request, sql, (int(request.match_info["id"]),))
        if not rows:
            raise web.HTTPNotFound()
        return web.json_response(rows[0])

    async def create_item(request: web.Request) -> web.Response:
        body = await request.json()
        await query(request, insert, (body["name"], body.get("qty", 0)))
        return web.json_response({"created": 1}, status=201)

    async def slow(request: web.Request) -> web.Response:
        await query(request, "SELECT pg_sleep(%s)", (float(request.query.get("s", 1)),))
        return web.json_response({"slept": True})

    async def stats(request: web.Request) -> web.Response:
        s = request.app[key].get_stats()
        size, idle = s.get("pool_size", 0), s.get("pool_available", 0)
        waiting = s.get("requests_waiting", 0)
        counts = {"size": size, "idle": idle, "in_use": size - idle, "waiting": waiting}
        return web.json_response({**counts, "listener": {}})

    async def up(request: web.Request) -> web.Response:
        return web.json_response({"up": True})

    app = web.Application()
    app.cleanup_ctx.append(lifespan)
    app.add_routes(
        [
            web.get("/items", list_items),
            web.get(r"/items/{id:\d+}", get_item),
            web.post("/items", create_item),
            web.get("/slow", slow),
            web.get("/stats", stats),
            web.get("/health/ready", up),
        ]
    )
    return app


def _serve_psycopg_pool() -> None:  # pragma: no cover - runs in the subprocess
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    app = psycopg_pool_app(os.environ["DATABASE_URL"])
    port = int(os.environ["PORT"])
    web.run_app(app, host="127.0.0.1", port=port, loop=loop, handler_cancellation=True)


if __name__ == "__main__":
    _serve_psycopg_pool()
