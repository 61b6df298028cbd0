r"""aiohttp integration (extra ``aiohttp``): the pool's lifecycle, its errors as HTTP
answers, and health checks.

```python
from aiohttp import web
from aiopg_resilient.integrations.aiohttp import (
    error_middleware, get_pool, health_routes, pool_ctx,
)

async def get_user(request: web.Request) -> web.Response:
    sql = "SELECT id, name FROM users WHERE id = %s"
    row = await get_pool(request).fetchone(sql, (int(request.match_info["id"]),))
    if row is None:
        raise web.HTTPNotFound()
    return web.json_response({"id": row[0], "name": row[1]})

app = web.Application(middlewares=[error_middleware])
app.cleanup_ctx.append(pool_ctx("postgresql://app@db/app", max_size=10))
app.add_routes([web.get(r"/users/{id:\d+}", get_user), *health_routes()])
web.run_app(app, handler_cancellation=True)
```

* `pool_ctx` opens the pool when the application starts and closes it at cleanup, which
  aiohttp runs after its graceful shutdown: requests in flight finish on a live pool.
* `error_middleware` answers `DatabaseUnavailable`, `PoolTimeout` and `ConnectionLost`
  with a 503 and ``Retry-After``, `CommitUnknown` with a 500 carrying the transaction id;
  the body is JSON, never a traceback. Every other exception goes on to aiohttp.
* `health_routes` adds a readiness check (from the pool's state, no query) and a liveness
  check (always 200: a database outage must not get the process restarted).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from .._connector import Conninfo
from .._pool import ResilientPool
from ._http import ERRORS, http_error, readiness

__all__ = [
    "POOL_KEY",
    "error_middleware",
    "get_pool",
    "health_routes",
    "pool_ctx",
]

POOL_KEY: web.AppKey[ResilientPool] = web.AppKey("pool", ResilientPool)
"""Where `pool_ctx` keeps the pool: ``app[POOL_KEY]`` (typed)."""

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def pool_ctx(
    dsn_or_pool: Conninfo | ResilientPool,
    *,
    wait: bool = False,
    timeout: float = 30.0,
    key: web.AppKey[ResilientPool] = POOL_KEY,
    **pool_kwargs: Any,
) -> CleanupCtx:
    """A cleanup context for ``app.cleanup_ctx.append(...)`` that owns a `ResilientPool`.

    At startup it opens the pool and stores it under ``app[key]``; at cleanup, after
    aiohttp has let the requests in flight finish, it closes it.

    Args:
        dsn_or_pool: a DSN, a callable returning one (rotating credentials), or a
            `ResilientPool` not yet opened (then *pool_kwargs* must be empty).
        wait: at startup, wait until ``min_size`` connections are up (the application
            does not start if they are not within *timeout*: `PoolTimeout`). Without it
            the application starts at once while the pool connects in the background,
            and readiness answers 503 until it can serve. A configuration error (wrong
            password, unknown database) stops the startup either way.
        timeout: seconds *wait* waits.
        key: another `web.AppKey` for a second pool (a read pool on standbys).
        pool_kwargs: `ResilientPool` arguments (``min_size``, ``max_size``, ``retry``...),
            validated here, before the application starts.

    A pool given by the caller is opened and closed by this context, once: a closed pool
    cannot be opened again. With a DSN, every startup gets a fresh pool, so the same
    application can be started again (tests).
    """
    if isinstance(dsn_or_pool, ResilientPool):
        if pool_kwargs:
            raise TypeError("pool_ctx(pool, ...) takes no pool arguments: give them to the pool")
    else:
        ResilientPool(dsn_or_pool, **pool_kwargs)  # validates the arguments; opens nothing

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if isinstance(dsn_or_pool, ResilientPool):
            pool = dsn_or_pool  # a second startup gets PoolClosed from open()
        else:
            pool = ResilientPool(dsn_or_pool, **pool_kwargs)
        try:
            await pool.open(wait=wait, timeout=timeout)
            app[key] = pool
            yield
        finally:
            await pool.close()

    return ctx


def get_pool(request: web.Request, key: web.AppKey[ResilientPool] = POOL_KEY) -> ResilientPool:
    """The pool `pool_ctx` opened, from a handler (found from a sub-application too)."""
    try:
        return request.config_dict[key]
    except KeyError:
        raise RuntimeError(
            "no ResilientPool in this application: add "
            "app.cleanup_ctx.append(pool_ctx(dsn)) before starting it"
        ) from None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer the layer's errors (`_http.http_error`) instead of a bare 500.

    `DatabaseUnavailable`, `PoolTimeout`, `ConnectionLost`: 503 with ``Retry-After``, the
    request may be retried. `CommitUnknown`: 500 whose body carries ``transaction_id``, the
    write may or may not have been applied. The error is logged (WARNING, ERROR) by the
    layer's ``aiopg_resilient.integrations`` logger; the body never holds a traceback.
    """
    try:
        return await handler(request)
    except ERRORS as exc:
        answer = http_error(exc)
        if answer is None:  # pragma: no cover - ERRORS are exactly what http_error answers
            raise
        return web.json_response(answer.body, status=answer.status, headers=answer.headers)


def health_routes(
    *,
    ready: str = "/health/ready",
    live: str = "/health/live",
    key: web.AppKey[ResilientPool] = POOL_KEY,
) -> list[web.RouteDef]:
    """Routes for ``app.add_routes(...)``: readiness and liveness probes (Kubernetes).

    *ready* answers 200 when the pool is open and can serve, else 503 with
    ``Retry-After`` and why (not open yet, or the database unreachable): it reads the
    pool's state and sends no query, so probes cost the database nothing. *live* always
    answers 200: restarting the process would not bring the database back.
    """

    async def readiness_probe(request: web.Request) -> web.Response:
        pool = request.config_dict.get(key)
        if pool is None:
            return web.json_response(
                {"ready": False, "detail": "the pool is not open"},
                status=503,
                headers={"Retry-After": "1"},
            )
        answer = readiness(pool)
        return web.json_response(answer.body, status=answer.status, headers=answer.headers)

    async def liveness_probe(request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    return [web.get(ready, readiness_probe), web.get(live, liveness_probe)]
