"""Guarantees 2, 12 and 13 across crash restarts: a transaction id is not a name for life.

After a crash (`stop -m immediate`) PostgreSQL hands out again the transaction ids that
never reached the WAL: the id the layer learnt before sending COMMIT can, after the
restart, belong to somebody else's transaction, and ``pg_xact_status()`` then answers
for that one. After a crash restart, "aborted" (or "in progress", or an id the server has
not handed out again yet) still proves ours did not commit, so a re-run is safe; but
"committed" cannot be told from a reused id, so the answer is `CommitUnknown`. Across a
clean restart (`restart -m fast`) every status stays trustworthy.

The TLS-terminating proxy holds the COMMIT (the server never gets it) and refuses new
connections, so the layer cannot look anything up until the test has crashed the server
and arranged who owns the id on the restarted one.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import psycopg
import pytest

from aiopg_resilient import CommitUnknown, ConnectionLost, DatabaseUnavailable, ResilientPool
from aiopg_resilient.testing import ChaosProxy, PostgresServer, Trigger

from .conftest import pool_for, until, until_value

pytestmark = pytest.mark.slow

# The backend of the pool's session, frozen right before COMMIT: its transaction id.
_HELD_XID = (
    "SELECT backend_xid::text FROM pg_stat_activity WHERE application_name = %s"
    " AND state = 'idle in transaction' AND backend_xid IS NOT NULL"
)
# The next transaction id the server will hand out, without taking one (no transaction
# runs while the tests read it, so the snapshot's xmax is exactly that).
_NEXT_XID = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text"
_ROUNDS = 3

Reuse = Literal["committed", "committed past the recovered WAL", "rolled back", "not reused"]


def _pool(proxy: ChaosProxy, app_name: str) -> ResilientPool:
    assert proxy.dsn is not None
    return pool_for(proxy.dsn, app_name, max_size=2, heartbeat_timeout=0.5)


async def _count(pg: PostgresServer, table: str, key: str) -> int:
    rows = await pg.execute(f"SELECT count(*) FROM {table} WHERE k = %s", (key,))
    return int(rows[0][0])


async def _next_xid(pg: PostgresServer) -> int:
    return int((await pg.execute(_NEXT_XID))[0][0])


def _widen(xid: int, next_full: int) -> int:
    """The 64-bit id of the 32-bit *xid*, handed out shortly before *next_full*."""
    full = (next_full & ~0xFFFFFFFF) | xid
    return full - (1 << 32) if full > next_full + (1 << 31) else full


async def _held_xid(pg: PostgresServer, app_name: str, trigger: Trigger) -> int:
    """Wait until the pool's COMMIT is held and its backend idles in the transaction."""
    await trigger.wait()
    with anyio.fail_after(5):
        while not (rows := await pg.execute(_HELD_XID, (app_name,))):
            await anyio.sleep(0.01)
    return _widen(int(rows[0][0]), await _next_xid(pg))


async def _write_ours(pool: ResilientPool, table: str, outcome: list[object]) -> None:
    try:
        outcome.append(await pool.execute(f"INSERT INTO {table} VALUES ('ours', 1)"))
    except Exception as exc:
        outcome.append(exc)


async def _take_xid(pg: PostgresServer, table: str, xid: int, *, commit: bool) -> None:
    """On the restarted server, run transactions that write until one gets *xid*; end
    that one with COMMIT or ROLLBACK."""
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:
        while True:
            await conn.execute("BEGIN")
            await conn.execute(f"INSERT INTO {table} VALUES ('theirs', 1)")
            cur = await conn.execute("SELECT pg_current_xact_id()::text")
            row = await cur.fetchone()
            assert row is not None
            got = int(row[0])
            if got >= xid:
                break
            await conn.execute("ROLLBACK")
        assert got == xid, f"wanted transaction id {xid} again, the server gave {got}"
        await conn.execute("COMMIT" if commit else "ROLLBACK")
    status = await pg.execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),))
    assert status == [("committed" if commit else "aborted",)]


async def _crash_round(
    pg: PostgresServer, proxy: ChaosProxy, app_name: str, table: str, reuse: Reuse
) -> tuple[int, bool, object]:
    """Hold a COMMIT, crash the server, arrange who owns its id, let the layer resolve.

    Returns the transaction id, whether the crash lost it (so it could be reused), and
    what ``execute()`` returned or raised.
    """
    outcome: list[object] = []
    async with _pool(proxy, app_name) as pool:
        await pool.fetchval("SELECT 1")
        # One connection only: no other one could look the status up behind our back.
        await until(lambda: proxy.stats.open == 1)
        proxy.refuse()
        try:
            trigger = proxy.on_client_message(b"COMMIT", "freeze_before")
            async with anyio.create_task_group() as tg:
                tg.start_soon(_write_ours, pool, table, outcome)
                xid = await _held_xid(pg, app_name, trigger)
                if reuse == "committed past the recovered WAL":
                    # Checkpoint times are whole seconds: let the end-of-recovery one be
                    # provably later than the moment the id was learnt.
                    await anyio.sleep(1.05)
                await pg.stop("immediate")
                await pg.start()
                # Release the held session: its COMMIT goes to a server that is gone. (Not
                # cut(): sending a FIN to a peer that reset the connection raises.)
                proxy.thaw()
                lost = await _next_xid(pg) <= xid
                if lost and reuse != "not reused":
                    await _take_xid(pg, table, xid, commit=reuse.startswith("committed"))
                if reuse == "committed":
                    # A checkpoint after the reuse: its next_xid is past the id, so nothing
                    # proves the id never reached the disk before the crash.
                    await pg.execute("CHECKPOINT")
                if lost and reuse == "not reused":
                    with pytest.raises(psycopg.errors.InvalidParameterValue, match="future"):
                        await pg.execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),))
                proxy.accept()  # now the layer may reconnect and resolve
        finally:
            proxy.accept()
    return xid, lost, outcome[0]


@pytest.mark.parametrize(
    "reuse", ["committed", "committed past the recovered WAL", "rolled back", "not reused"]
)
async def test_commit_lost_in_a_crash(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str, reuse: Reuse
) -> None:
    """Guarantees 2, 12, 13: after a crash, "committed" for a reused id is CommitUnknown,
    unless the id is past the next_xid of a checkpoint written after it was learnt (the
    end-of-recovery one): then ours provably never reached the disk and is re-run once,
    like an aborted or never reused id."""
    with anyio.fail_after(60):
        for _ in range(_ROUNDS):
            xid, lost, result = await _crash_round(pg, tls_chaos_proxy, app_name, table, reuse)
            if lost:
                break
            # The insert reached the WAL before the crash (a background flush), so its id
            # survived as "aborted": a re-run is right, but nothing was reused. Again.
            assert result == 1, f"execute() gave {result!r} for a crashed, aborted transaction"
            assert await _count(pg, table, "ours") == 1
            await pg.execute(f"DELETE FROM {table}")
        else:
            pytest.fail(f"the crash never lost the transaction id in {_ROUNDS} rounds")

    ours = await _count(pg, table, "ours")
    theirs = await _count(pg, table, "theirs")
    if reuse == "committed":
        assert isinstance(result, CommitUnknown), (
            f"execute() gave {result!r} for transaction {xid}, lost in the crash; the "
            f"restarted server reused id {xid} for another transaction, which committed"
        )
        assert result.xid == xid
        assert (ours, theirs) == (0, 1)
    elif reuse == "committed past the recovered WAL":
        assert result == 1, f"execute() gave {result!r}; the transaction {xid} is proven lost"
        assert (ours, theirs) == (1, 1)
    else:
        assert result == 1, f"execute() gave {result!r}; the transaction {xid} is proven lost"
        assert (ours, theirs) == (1, 0)


@pytest.mark.parametrize(("action", "applied"), [("cut_after", True), ("freeze_before", False)])
async def test_commit_lost_across_a_clean_restart(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    action: str,
    applied: bool,
) -> None:
    """Guarantee 12: across `restart -m fast` statuses are trusted: committed -> success,
    aborted -> re-run; exactly once, no CommitUnknown."""
    outcome: list[object] = []
    with anyio.fail_after(30):
        async with _pool(tls_chaos_proxy, app_name) as pool:
            await pool.fetchval("SELECT 1")
            await until(lambda: tls_chaos_proxy.stats.open == 1)
            tls_chaos_proxy.refuse()
            try:
                trigger = tls_chaos_proxy.on_client_message(b"COMMIT", action)  # type: ignore[arg-type]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_write_ours, pool, table, outcome)
                    if applied:  # the server ran the COMMIT; the answer was lost
                        await trigger.wait()
                        await until_value(lambda: _count(pg, table, "ours"), 1)
                    else:  # the COMMIT is held; the transaction is still open
                        await _held_xid(pg, app_name, trigger)
                    await pg.restart("fast")
                    tls_chaos_proxy.thaw()  # a held COMMIT goes to a server that is gone
                    tls_chaos_proxy.accept()  # now the layer may reconnect and resolve
            finally:
                tls_chaos_proxy.accept()
            assert pool.stats.commits_unknown == 0
    assert outcome == [1], f"execute() gave {outcome[0]!r} across a clean restart"
    assert await _count(pg, table, "ours") == 1


# --- a crash loop under a write workload ----------------------------------------------------

LOOP_TASKS = 16
LOOP_SECONDS = 30.0
ACCOUNTS = 8
START_BALANCE = 1000


@dataclass
class _Ledger:
    outcome: dict[str, str] = field(default_factory=dict)
    """Operation -> "ok", "unknown" (CommitUnknown) or the error's type name."""
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Operation -> the keys it inserts (two for a transaction() block)."""
    messages: dict[str, str] = field(default_factory=dict)
    """Error type -> the first message seen."""
    crashes: int = 0


async def _block(pool: ResilientPool, table: str, keys: tuple[str, ...]) -> None:
    async with pool.transaction() as conn:
        for key in keys:
            await conn.execute(f"INSERT INTO {table} VALUES (%s, 1)", (key,))


async def _transfer(
    conn: psycopg.AsyncConnection[Any], table: str, key: str, a: int, b: int, amount: int
) -> None:
    # a < b: both transfers take the row locks in the same order, so they never deadlock.
    await conn.execute(f"UPDATE {table}_acct SET balance = balance - %s WHERE id = %s", (amount, a))
    await conn.execute(f"UPDATE {table}_acct SET balance = balance + %s WHERE id = %s", (amount, b))
    await conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (key, amount))


async def _writer(pool: ResilientPool, n: int, table: str, ledger: _Ledger, t_end: float) -> None:
    rng = random.Random(1000 + n)
    i = 0
    while time.monotonic() < t_end:
        i += 1
        roll = rng.random()
        call: Awaitable[object]
        if roll < 0.4:
            op = f"e-{n}-{i}"
            ledger.keys[op] = (op,)
            call = pool.execute(f"INSERT INTO {table} VALUES (%s, 1)", (op,))
        elif roll < 0.7:
            op = f"b-{n}-{i}"
            ledger.keys[op] = (f"{op}-1", f"{op}-2")
            call = _block(pool, table, ledger.keys[op])
        else:
            op = f"t-{n}-{i}"
            ledger.keys[op] = (op,)
            a, b = sorted(rng.sample(range(ACCOUNTS), 2))
            amount = rng.randint(-50, 50)
            call = pool.run_transaction(_transfer, table, op, a, b, amount)
        try:
            await call
            ledger.outcome[op] = "ok"
        except CommitUnknown:
            ledger.outcome[op] = "unknown"
        except Exception as exc:
            name = type(exc).__name__
            ledger.outcome[op] = name
            ledger.messages.setdefault(name, str(exc))
        await anyio.sleep(0.002)


async def _crash_loop(pg: PostgresServer, ledger: _Ledger, t_end: float) -> None:
    """`stop -m immediate`, 0.3-1 s down, start; a crash every 2-3.5 s (seeded)."""
    rng = random.Random(7)
    next_crash = time.monotonic() + rng.uniform(2.0, 3.5)
    while next_crash < t_end - 2.5:
        await anyio.sleep(max(next_crash - time.monotonic(), 0.5))
        await pg.stop("immediate")
        try:
            await anyio.sleep(rng.uniform(0.3, 1.0))
        finally:
            with anyio.CancelScope(shield=True):
                await pg.start()
        ledger.crashes += 1
        next_crash += rng.uniform(2.0, 3.5)


@pytest.mark.parametrize("via", ["direct", "tls proxy"])
async def test_crash_loop(
    pg: PostgresServer, app_name: str, table: str, via: str, request: pytest.FixtureRequest
) -> None:
    """Guarantees 2, 12, 13 under repeated crash restarts: no write acknowledged and lost,
    doubled, applied after an error, or half applied; balances conserved."""
    if via == "direct":
        dsn = pg.dsn
    else:
        proxy: ChaosProxy = request.getfixturevalue("tls_chaos_proxy")
        assert proxy.dsn is not None
        dsn = proxy.dsn
    await pg.execute(f"CREATE TABLE {table}_acct (id int PRIMARY KEY, balance int)")
    await pg.execute(
        f"INSERT INTO {table}_acct SELECT g, {START_BALANCE} FROM generate_series(0, "
        f"{ACCOUNTS - 1}) g"
    )
    ledger = _Ledger()
    try:
        with anyio.fail_after(LOOP_SECONDS + 40):
            pool = pool_for(dsn, app_name, min_size=8, max_size=8, heartbeat_timeout=1.0)
            async with pool:
                t_end = time.monotonic() + LOOP_SECONDS
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_crash_loop, pg, ledger, t_end)
                    for n in range(LOOP_TASKS):
                        tg.start_soon(_writer, pool, n, table, ledger, t_end)
                stats = pool.stats
            rows = await pg.execute(f"SELECT k, count(*) FROM {table} GROUP BY k")
            balance = (await pg.execute(f"SELECT sum(balance) FROM {table}_acct"))[0][0]
    finally:
        if pg.running:
            await pg.execute(f"DROP TABLE IF EXISTS {table}_acct")

    counts = {k: int(c) for k, c in rows}
    outcome, keys = ledger.outcome, ledger.keys
    present = {op: [k in counts for k in keys[op]] for op in outcome}
    acknowledged = [op for op, o in outcome.items() if o == "ok"]
    lost = [op for op in acknowledged if not all(present[op])]
    doubled = [k for k, c in counts.items() if c > 1]
    phantom = [op for op, o in outcome.items() if o not in ("ok", "unknown") and any(present[op])]
    torn = [op for op in outcome if len(set(present[op])) > 1]
    unknown = [op for op, o in outcome.items() if o == "unknown"]
    unknown_applied = [op for op in unknown if all(present[op])]
    errors = collections.Counter(o for o in outcome.values() if o not in ("ok", "unknown"))
    # ConnectionLost is the answer of a transaction() block whose connection died inside
    # it (nothing applied); any other error, or ConnectionLost elsewhere, is wrong here.
    wrong = [
        (op, o, ledger.messages[o])
        for op, o in outcome.items()
        if o not in ("ok", "unknown") and not (o == ConnectionLost.__name__ and op[0] == "b")
    ]
    stray = sorted(set(counts) - {k for op in outcome for k in keys[op]})
    print(
        f"\ncrash loop ({via}): {ledger.crashes} crashes, {len(outcome)} writes attempted, "
        f"{len(acknowledged)} acknowledged, lost {len(lost)}, doubled {len(doubled)}, "
        f"phantom {len(phantom)}, torn {len(torn)}, CommitUnknown {len(unknown)} "
        f"({len(unknown_applied)} applied, {len(unknown) - len(unknown_applied)} not), "
        f"other errors {dict(errors)}; commits resolved {stats.commits_resolved}, "
        f"retries {stats.retries}, connections lost {stats.connections_lost}"
    )
    assert lost == []
    assert doubled == []
    assert phantom == []
    assert torn == []
    assert stray == []
    assert wrong == []
    assert errors[DatabaseUnavailable.__name__] == 0
    assert balance == ACCOUNTS * START_BALANCE
    assert ledger.crashes >= 7
    assert len(acknowledged) > 300
