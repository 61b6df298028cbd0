"""An aiohttp CRUD service on aiopg_resilient: items, a transfer, a LISTEN task, pool stats.

Run it (on uvloop when installed): ``python examples/aiohttp_app.py`` (env DATABASE_URL,
HOST=127.0.0.1, PORT=8080), then ``curl -d '{"name": "bolt", "qty": 5}' localhost:8080/items``.
Without DATABASE_URL it starts a throwaway PostgreSQL and says so (needs the server binaries
and the ``testing`` extra).
Routes: GET /items, /items/{id}, /slow?s=1, /stats, /health/ready, /health/live; POST /items,
/transfer {"src", "dst", "qty"}; PUT, DELETE /items/{id}.
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
from aiohttp import web
from psycopg.rows import dict_row

from aiopg_resilient import Reconnected, ResilientPool
from aiopg_resilient.integrations.aiohttp import (
    POOL_KEY,
    error_middleware,
    get_pool,
    health_routes,
    pool_ctx,
)

SCHEMA = """CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, name text NOT NULL,
    qty int NOT NULL DEFAULT 0 CHECK (qty >= 0))"""
# One statement: the NOTIFY goes out if and only if the INSERT commits.
INSERT = """WITH new AS (INSERT INTO items (name, qty) VALUES (%s, %s) RETURNING id)
    SELECT pg_notify('items', id::text) FROM new"""
SEEN: web.AppKey[dict[str, int]] = web.AppKey("seen")  # what the LISTEN task saw
routes = web.RouteTableDef()
log = logging.getLogger("aiohttp_app")


@routes.get("/items")
async def list_items(request: web.Request) -> web.Response:
    pool, limit = get_pool(request), int(request.query.get("n", 20))
    total = await pool.fetchval("SELECT count(*) FROM items")  # reads: replayed if cut
    rows = await pool.fetch("SELECT * FROM items ORDER BY id DESC LIMIT %s", (limit,))
    return web.json_response({"total": total, "items": rows})


@routes.get(r"/items/{id:\d+}")
async def get_item(request: web.Request) -> web.Response:
    sql = "SELECT * FROM items WHERE id = %s"
    if row := await get_pool(request).fetchone(sql, (int(request.match_info["id"]),)):
        return web.json_response(row)
    raise web.HTTPNotFound()


@routes.post("/items")
async def create_item(request: web.Request) -> web.Response:
    body = await request.json()  # a write: applied once, or a 500 CommitUnknown with its id
    await get_pool(request).execute(INSERT, (body["name"], body.get("qty", 0)))
    return web.json_response({"created": 1}, status=201)


@routes.put(r"/items/{id:\d+}")
async def update_item(request: web.Request) -> web.Response:
    args = ((await request.json())["qty"], int(request.match_info["id"]))
    if await get_pool(request).execute("UPDATE items SET qty = %s WHERE id = %s", args):
        return web.json_response({"updated": 1})
    raise web.HTTPNotFound()


@routes.delete(r"/items/{id:\d+}")
async def delete_item(request: web.Request) -> web.Response:
    args = (int(request.match_info["id"]),)
    if await get_pool(request).execute("DELETE FROM items WHERE id = %s", args):
        return web.json_response({"deleted": 1})
    raise web.HTTPNotFound()


async def move(conn: psycopg.AsyncConnection[Any], src: int, dst: int, qty: int) -> None:
    """Both rows or neither; re-run by run_transaction after a lost connection or a deadlock."""
    for item, delta in ((src, -qty), (dst, qty)):
        cur = await conn.execute("UPDATE items SET qty = qty + %s WHERE id = %s", (delta, item))
        if cur.rowcount != 1:
            raise web.HTTPNotFound(text=f"no item {item}")  # rolled back, not re-run


@routes.post("/transfer")
async def transfer(request: web.Request) -> web.Response:
    body = await request.json()
    try:
        await get_pool(request).run_transaction(move, body["src"], body["dst"], body["qty"])
    except psycopg.errors.CheckViolation:
        raise web.HTTPConflict(text="not enough in stock") from None
    return web.json_response({"moved": body["qty"]})


@routes.get("/slow")
async def slow(request: web.Request) -> web.Response:
    seconds = min(float(request.query.get("s", 1)), 10.0)
    await get_pool(request).fetchval("SELECT pg_sleep(%s)", (seconds,))
    return web.json_response({"slept": seconds})


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:  # size, idle, in_use, waiting...
    counts = dataclasses.asdict(get_pool(request).stats)
    return web.json_response({**counts, "listener": request.app[SEEN]})


async def listener(pool: ResilientPool, seen: dict[str, int]) -> None:
    """Follow new items by NOTIFY; after a reconnect (notifications missed), resync."""
    while True:
        try:
            async for item in pool.listen("items"):
                if isinstance(item, Reconnected):
                    seen["reconnects"] += 1
                    seen["last_id"] = await pool.fetchval("SELECT coalesce(max(id), 0) FROM items")
                else:
                    seen["notifications"] += 1
                    seen["last_id"] = max(seen["last_id"], int(item.payload))
            return  # the pool was closed
        except psycopg.OperationalError as exc:  # DatabaseUnavailable: down for the whole budget
            log.warning("listener: %s; listening again in 1 s", exc)
            await asyncio.sleep(1)


async def schema_and_listener(app: web.Application) -> AsyncIterator[None]:
    await app[POOL_KEY].execute(SCHEMA, idempotent=True)
    app[SEEN] = {"notifications": 0, "reconnects": 0, "last_id": 0}
    task = asyncio.create_task(listener(app[POOL_KEY], app[SEEN]))
    yield
    task.cancel()  # before pool_ctx closes the pool: cleanup runs in reverse order
    with contextlib.suppress(asyncio.CancelledError):
        await task


def serve(dsn: str) -> None:
    app = web.Application(middlewares=[error_middleware])
    app.cleanup_ctx.append(pool_ctx(dsn, max_size=10, connect_kwargs={"row_factory": dict_row}))
    app.cleanup_ctx.append(schema_and_listener)
    app.add_routes([*routes, *health_routes()])
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", 8080))
    # A client gone cancels its handler, which frees its connection at once (cancelling is
    # safe with the pool; a COMMIT already sent still completes). SIGTERM: graceful.
    web.run_app(app, host=host, port=port, loop=loop, handler_cancellation=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if "DATABASE_URL" in os.environ:
        serve(os.environ["DATABASE_URL"])
    else:
        from aiopg_resilient.testing import PostgresServer

        with PostgresServer() as pg:
            print(f"DATABASE_URL is not set: a throwaway PostgreSQL on {pg.host}:{pg.port}")
            serve(pg.dsn)
