"""FastAPI integration (extra ``fastapi``): the pool in the application's lifespan,
dependencies for the pool, a connection and a transaction, the layer's errors as HTTP
answers, and health probes.

```python
from fastapi import FastAPI
from aiopg_resilient.integrations.fastapi import (
    Pool, Transaction, health_router, install_error_handlers, pool_lifespan,
)

app = FastAPI(lifespan=pool_lifespan("postgresql://app@db/app", max_size=10))
install_error_handlers(app)
app.include_router(health_router())

@app.get("/items/{item_id}")
async def item(item_id: int, pool: Pool) -> dict[str, object]:
    name = await pool.fetchval("SELECT name FROM items WHERE id = %s", (item_id,))
    return {"name": name}

@app.post("/items/{item_id}/sell")
async def sell(item_id: int, conn: Transaction) -> dict[str, bool]:
    await conn.execute("UPDATE items SET qty = qty - 1 WHERE id = %s", (item_id,))
    await conn.execute("INSERT INTO sales (item) VALUES (%s)", (item_id,))
    return {"sold": True}  # committed before this response is sent
```

* `pool_lifespan` opens the pool at startup and closes it at shutdown, after the server
  has let the requests in flight finish (uvicorn drains them before the lifespan exits).
* `Pool`, `Connection` and `Transaction` are ``Annotated`` dependencies; `get_pool`,
  `connection` and `transaction` are the functions behind them.
* `install_error_handlers` answers `DatabaseUnavailable`, `PoolTimeout`, `ConnectionLost`
  (and `PoolClosed`, shutting down) with a 503 and ``Retry-After``, `CommitUnknown` with a
  500 whose JSON body says the outcome is unknown and carries the transaction id; never a
  traceback.
* `health_router` adds a readiness probe (the pool's state, no query) and a liveness probe
  (always 200: restarting the process would not bring the database back).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from psycopg import AsyncConnection
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from .._connector import Conninfo
from .._pool import ResilientPool
from ._http import ERRORS, http_error, readiness

__all__ = [
    "Connection",
    "Pool",
    "Transaction",
    "connection",
    "get_pool",
    "health_router",
    "install_error_handlers",
    "pool_lifespan",
    "transaction",
]

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[dict[str, Any]]]
"""What `pool_lifespan` returns: ``FastAPI(lifespan=...)`` takes it."""
UserLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]
"""A lifespan of your own (``@asynccontextmanager async def lifespan(app): ... yield``)."""

_KEY = "pool"

# FastAPI >= 0.121 can end a yield dependency after the endpoint and before the response
# (``Depends(scope="function")``). Without it, most versions end it after the response is
# sent: a COMMIT there could fail or be in doubt with nobody left to tell. We refuse those.
_SCOPED = "scope" in inspect.signature(Depends).parameters


def pool_lifespan(
    dsn_or_pool: Conninfo | ResilientPool = "",
    *,
    wait: bool = False,
    timeout: float = 30.0,
    lifespan: UserLifespan | None = None,
    key: str = _KEY,
    **pool_kwargs: Any,
) -> Lifespan:
    """A lifespan for ``FastAPI(lifespan=...)`` (or Starlette) that owns a `ResilientPool`.

    At startup it opens the pool, sets it on ``app.state.pool`` and yields it in the
    lifespan state too (``request.state.pool``); then it runs *lifespan*, yours, with the
    pool open: start your background tasks there. At shutdown your lifespan ends first,
    then the pool is closed. uvicorn lets the requests in flight finish before it ends
    the lifespan, so they finish on an open pool.

    Args:
        dsn_or_pool: a DSN, a callable returning one (rotating credentials), or a
            `ResilientPool` not yet opened (then *pool_kwargs* must be empty). The
            default, ``""``, is libpq's ``PG*`` environment variables.
        wait: at startup, wait until ``min_size`` connections are up; the application
            does not start if they are not within *timeout* (`PoolTimeout`). Without it
            the application starts at once while the pool connects in the background,
            and readiness answers 503 until it can serve. A configuration error (wrong
            password, unknown database) stops the startup either way.
        timeout: seconds *wait* waits.
        lifespan: your own lifespan, run inside this one; the state it yields is merged
            into the lifespan state.
        key: the attribute (``app.state.<key>``) and state key; another one for a second
            pool (a read pool on standbys), which `get_pool` and the dependencies do not
            see: reach it through ``request.state.<key>``.
        pool_kwargs: `ResilientPool` arguments (``min_size``, ``max_size``, ``retry``,
            ``name``...), validated here, before the application starts.

    A pool given by the caller is opened and closed by this lifespan, once: a closed pool
    cannot be opened again. With a DSN, every startup gets a fresh pool, so the same
    application can be started again (tests).
    """
    if isinstance(dsn_or_pool, ResilientPool):
        if pool_kwargs:
            raise TypeError(
                "pool_lifespan(pool, ...) takes no pool arguments: give them to the pool"
            )
        given: ResilientPool | None = dsn_or_pool
    else:
        given = ResilientPool(dsn_or_pool, **pool_kwargs)  # validates the arguments now

    @asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        nonlocal given
        if given is not None:
            pool, given = given, None
        elif isinstance(dsn_or_pool, ResilientPool):
            raise RuntimeError("the pool given to pool_lifespan() was closed by an earlier run")
        else:
            pool = ResilientPool(dsn_or_pool, **pool_kwargs)
        try:
            await pool.open(wait=wait, timeout=timeout)
            setattr(app.state, key, pool)
            if lifespan is None:
                yield {key: pool}
            else:
                async with lifespan(app) as state:
                    yield {**(state or {}), key: pool}
        finally:
            await pool.close()

    return run


def _find(request: HTTPConnection) -> ResilientPool | None:
    # The lifespan state first: it reaches mounted sub-applications, app.state does not.
    for state in (request.state, request.app.state):
        pool = getattr(state, _KEY, None)
        if isinstance(pool, ResilientPool):
            return pool
    return None


def _pool_of(request: HTTPConnection) -> ResilientPool:
    pool = _find(request)
    if pool is None:
        raise RuntimeError(
            "no ResilientPool in this application: create it with "
            "FastAPI(lifespan=pool_lifespan(dsn)), and run its lifespan"
        )
    return pool


async def get_pool(request: HTTPConnection) -> ResilientPool:
    """The pool `pool_lifespan` opened: ``Depends(get_pool)``, or the `Pool` annotation.

    A coroutine function, so that FastAPI calls it on the event loop, not in its thread
    pool. Outside a dependency, the pool is ``request.app.state.pool``.
    """
    return _pool_of(request)


def _check_scoped() -> None:
    if not _SCOPED:
        raise RuntimeError(
            "the connection and transaction dependencies need FastAPI >= 0.121: this "
            "version ends a dependency after the response is sent, so a failed or in-doubt "
            "COMMIT would be answered 200. Use `async with pool.transaction() as conn:` "
            "in the endpoint instead, or upgrade FastAPI"
        )


async def connection(request: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection for the endpoint: ``pool.connection()`` around it (the `Connection`
    annotation).

    Connecting is retried; the block commits when the endpoint returns and rolls back
    when it raises (`HTTPException` included), before the response is sent, so a lost or
    in-doubt COMMIT is answered (`CommitUnknown`: 500) instead of a 200. The connection
    goes back to the pool then, or is closed if its state is unknown, also when the
    request is cancelled (a timeout middleware, a server cancelling a client gone).

    Only for regular endpoints: a streaming body (a generator endpoint, a
    ``StreamingResponse``) and ``BackgroundTasks`` run after the connection went back to
    the pool, where another request may hold it. Use ``async with pool.transaction()``
    (``pool: Pool``) inside those.
    """
    _check_scoped()
    async with _pool_of(request).connection() as conn:
        yield conn


async def transaction(request: HTTPConnection) -> AsyncIterator[AsyncConnection[Any]]:
    """One transaction around the endpoint: ``pool.transaction()`` (the `Transaction`
    annotation).

    Committed when the endpoint returns, before the response is sent; rolled back when it
    raises. A connection lost before COMMIT is `ConnectionLost` (503: nothing applied); a
    lost COMMIT is resolved, or `CommitUnknown` (500 with the transaction id). Released on
    cancellation as `connection` is. To have the layer re-run the work after a loss, use
    ``await pool.run_transaction(fn, ...)`` in the endpoint instead. Not for streaming
    bodies or background tasks (see `connection`).
    """
    _check_scoped()
    async with _pool_of(request).transaction() as conn:
        yield conn


def _before_response(dependency: Callable[..., Any]) -> Any:
    if _SCOPED:
        return Depends(dependency, scope="function")
    return Depends(dependency)


Pool = Annotated[ResilientPool, Depends(get_pool)]
"""``pool: Pool`` in an endpoint: the application's `ResilientPool`."""
Connection = Annotated[AsyncConnection[Any], _before_response(connection)]
"""``conn: Connection``: a psycopg connection held for the endpoint (see `connection`)."""
Transaction = Annotated[AsyncConnection[Any], _before_response(transaction)]
"""``conn: Transaction``: one transaction around the endpoint (see `transaction`)."""


async def _answer(request: Request, exc: Exception) -> Response:
    answer = http_error(exc)
    if answer is None:  # pragma: no cover - ERRORS are exactly what http_error answers
        raise exc
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


def install_error_handlers(app: Starlette) -> None:
    """Answer the layer's errors (every one `_http.ERRORS` lists) instead of a bare 500.

    `DatabaseUnavailable`, `PoolTimeout`, `ConnectionLost` (and `PoolClosed`: shutting
    down): 503 with ``Retry-After``, the request may be retried. `CommitUnknown`: 500
    whose body says the write may or may not have been applied and carries
    ``transaction_id``. The error is logged (WARNING, ERROR) by the layer's
    ``aiopg_resilient.integrations`` logger; the body is JSON and never holds a
    traceback. Every other exception is left to the application's handlers.
    """
    for error in ERRORS:
        app.add_exception_handler(error, _answer)


def health_router(
    *,
    ready: str = "/health/ready",
    live: str = "/health/live",
    include_in_schema: bool = False,
) -> APIRouter:
    """Readiness and liveness probes (Kubernetes): ``app.include_router(health_router())``.

    *ready* answers 200 when the pool is open and can serve, else 503 with
    ``Retry-After`` and why (not open yet, or the database unreachable): it reads the
    pool's state and sends no query, so probes cost the database nothing. *live* always
    answers 200: restarting the process would not bring the database back.
    """

    async def readiness_probe(request: Request) -> Response:
        pool = _find(request)
        if pool is None:
            return JSONResponse(
                {"ready": False, "detail": "the pool is not open"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        answer = readiness(pool)
        return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

    async def liveness_probe() -> Response:
        return JSONResponse({"alive": True})

    router = APIRouter()
    router.add_api_route(
        ready, readiness_probe, methods=["GET"], include_in_schema=include_in_schema
    )
    router.add_api_route(live, liveness_probe, methods=["GET"], include_in_schema=include_in_schema)
    return router
