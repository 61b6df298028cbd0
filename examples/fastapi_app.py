"""A FastAPI service on aiopg_resilient: notes (CRUD), transfers, a LISTEN task, pool stats.

Run: DATABASE_URL=postgresql://... uvicorn examples.fastapi_app:app --loop uvloop
 or: python examples/fastapi_app.py  (HOST, PORT; without DATABASE_URL, a throwaway PostgreSQL)
Try: curl -H 'content-type: application/json' -d '{"key": "k1", "body": "hi"}' :8000/notes
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from fastapi import FastAPI, HTTPException
from psycopg.rows import dict_row
from pydantic import BaseModel

from aiopg_resilient import Reconnected, ResilientPool
from aiopg_resilient.integrations.fastapi import (
    Connection,
    Pool,
    Transaction,
    health_router,
    install_error_handlers,
    pool_lifespan,
)

SCHEMA = (  # no UNIQUE on notes.key: the tests count rows per key to prove none is doubled
    "CREATE TABLE IF NOT EXISTS notes (id bigserial PRIMARY KEY, key text, body text)",
    "CREATE TABLE IF NOT EXISTS accounts (id int PRIMARY KEY, balance bigint CHECK (balance >= 0))",
    "CREATE TABLE IF NOT EXISTS transfers (key text, src int, dst int, amount int)",
    "INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, 5) g ON CONFLICT DO NOTHING",
)
INSERT = """WITH new AS (INSERT INTO notes (key, body) VALUES (%s, %s) RETURNING id)
    SELECT pg_notify('notes', id::text) FROM new"""  # the NOTIFY goes out iff the row commits
log = logging.getLogger("fastapi_app")


class Note(BaseModel):
    key: str
    body: str = ""


async def follow(pool: ResilientPool, seen: dict[str, int]) -> None:
    """Follow new notes by NOTIFY; after a reconnect (notifications missed), resync."""
    while True:
        try:
            async for item in pool.listen("notes"):
                if isinstance(item, Reconnected):
                    seen["reconnects"] += 1
                    seen["last_id"] = await pool.fetchval("SELECT coalesce(max(id), 0) FROM notes")
                else:
                    seen["notifications"] += 1
                    seen["last_id"] = max(seen["last_id"], int(item.payload))
            return  # the pool was closed
        except psycopg.OperationalError as exc:  # DatabaseUnavailable: down for the whole budget
            log.warning("listener: %s; listening again in 1 s", exc)
            await asyncio.sleep(1)


@contextlib.asynccontextmanager
async def schema_and_listener(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside pool_lifespan: app.state.pool is open until this has ended."""
    for statement in SCHEMA:
        await app.state.pool.execute(statement, idempotent=True)
    task = asyncio.create_task(follow(app.state.pool, seen))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    from aiopg_resilient.testing import PostgresServer

    server = PostgresServer()  # stopped and deleted at exit
    server.open_sync()
    print(f"DATABASE_URL is not set: started a throwaway PostgreSQL on port {server.port}")
    return server.dsn


seen = {"notifications": 0, "reconnects": 0, "last_id": 0}  # what the LISTEN task saw
lifespan = pool_lifespan(
    database_url(),
    lifespan=schema_and_listener,
    max_size=10,
    connect_kwargs={"row_factory": dict_row},
)
app = FastAPI(lifespan=lifespan)
install_error_handlers(app)  # 503 + Retry-After; CommitUnknown: 500 with the transaction id
app.include_router(health_router())  # /health/ready, /health/live


@app.get("/notes")
async def list_notes(pool: Pool, limit: int = 20) -> dict[str, Any]:
    total = await pool.fetchval("SELECT count(*) FROM notes")  # reads: replayed if cut
    rows = await pool.fetch("SELECT * FROM notes ORDER BY id DESC LIMIT %s", (limit,))
    return {"total": total, "notes": rows}


@app.post("/notes", status_code=201)
async def create_note(note: Note, pool: Pool) -> dict[str, int]:
    # A write: applied exactly once, or a 500 that says so with the transaction id.
    return {"created": await pool.execute(INSERT, (note.key, note.body))}


@app.put("/notes/{note_id}")
async def edit_note(note_id: int, note: Note, conn: Transaction) -> dict[str, Any]:
    sql = "UPDATE notes SET body = %s WHERE id = %s RETURNING *"
    if row := await (await conn.execute(sql, (note.body, note_id))).fetchone():
        return dict(row)  # committed before this response is sent
    raise HTTPException(404, "no such note")  # rolled back


@app.delete("/notes/{note_id}")
async def delete_note(note_id: int, pool: Pool) -> dict[str, int]:
    if await pool.execute("DELETE FROM notes WHERE id = %s", (note_id,)):
        return {"deleted": 1}
    raise HTTPException(404, "no such note")


async def move(conn: psycopg.AsyncConnection[Any], key: str, src: int, dst: int, n: int) -> None:
    """Both accounts and the log, or nothing; re-run after a lost connection or a deadlock."""
    for account, delta in sorted(((src, -n), (dst, n))):  # always in one order: no deadlock
        sql = "UPDATE accounts SET balance = balance + %s WHERE id = %s"
        if (await conn.execute(sql, (delta, account))).rowcount != 1:
            raise HTTPException(404, f"no account {account}")  # rolled back, not re-run
    await conn.execute("INSERT INTO transfers VALUES (%s, %s, %s, %s)", (key, src, dst, n))


@app.post("/transfers", status_code=201)  # ?key=t1&src=1&dst=2&amount=5
async def transfer(key: str, src: int, dst: int, amount: int, pool: Pool) -> dict[str, int]:
    try:
        await pool.run_transaction(move, key, src, dst, amount)
    except psycopg.errors.CheckViolation:
        raise HTTPException(409, "insufficient balance") from None
    return {"moved": amount}


@app.get("/report")
async def report(conn: Connection, seconds: float = 1.0) -> dict[str, float]:
    # Slow, on a held connection: released when done, on an error, or if cancelled.
    await conn.execute("SELECT pg_sleep(%s)", (min(seconds, 10.0),))
    return {"slept": seconds}


@app.get("/stats")
async def stats(pool: Pool) -> dict[str, Any]:
    return {**dataclasses.asdict(pool.stats), "listener": seen}


if __name__ == "__main__":
    import uvicorn

    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", 8000))
    uvicorn.run(app, host=host, port=port, loop="uvloop")
