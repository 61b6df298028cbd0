"""What the bench modules share: the query and its answer, the INSERT, the timeouts, the
logger, the pool sizes, what a contender is connected to (`Target`) and what an opened
contender offers (`Subject`), stopping worker tasks and naming an error."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

QUERY = "SELECT 1"
TLS_QUERY = "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
EXPECTED = 1  # the answer every read must return; anything else counts as an error
SETUP_TIMEOUT = 30.0  # opening a contender (connections made, pool full)
FINISH_TIMEOUT = 10.0  # stopping worker tasks once a measurement is over
ERROR_PAUSE = 0.01  # an application loop waits this long after an error (never spins)
POOL_SIZE = 8  # connections at concurrency > 1 (1 connection at concurrency 1)

# One row per write; the table is created by whoever measures writes.
WRITE_TABLE = "bench_w"
INSERT = f"INSERT INTO {WRITE_TABLE} (k, v) VALUES (%s, 1)"  # psycopg
INSERT_DOLLAR = f"INSERT INTO {WRITE_TABLE} (k, v) VALUES ($1, 1)"  # asyncpg
INSERT_NAMED = f"INSERT INTO {WRITE_TABLE} (k, v) VALUES (:k, 1)"  # SQLAlchemy text()

log = logging.getLogger("bench")


def pool_size(concurrency: int) -> int:
    """Connections a contender holds when *concurrency* tasks use it."""
    return 1 if concurrency == 1 else POOL_SIZE


class Target(Protocol):
    """Where a contender connects: a `PostgresServer`, or a proxy in front of it."""

    @property
    def dsn(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def dbname(self) -> str: ...
    @property
    def ca_path(self) -> Path | None: ...


Op = Callable[[int], Awaitable[Any]]  # op(task_index) -> the answer of QUERY
WriteOp = Callable[[int, str], Awaitable[Any]]  # write(task_index, key): one row inserted
WRITE_MODES: dict[str, str] = {
    "insert": "one INSERT",
    "transaction": "BEGIN; INSERT; COMMIT",
    "idempotent": "one INSERT, idempotent=True",
}
"""The ways of writing one row a contender may offer (`Subject.writes`)."""


@dataclass
class Subject:
    """An opened contender: a read, a TLS probe, a borrow-and-return and its writes."""

    op: Op
    tls: Callable[[], Awaitable[Any]]
    borrow: Callable[[], Awaitable[None]]
    """Borrow an idle connection and give it back, running nothing on it."""
    writes: dict[str, WriteOp] = field(default_factory=dict)
    """Keys of WRITE_MODES."""


async def finish(tasks: Sequence[asyncio.Task[Any]], timeout: float = FINISH_TIMEOUT) -> None:
    """Wait (bounded) for tasks told to stop; cancel stragglers; retrieve every outcome."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        log.warning("%d task(s) did not stop within %.0f s; cancelled", len(pending), timeout)
        await asyncio.wait(pending, timeout=timeout)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("worker task failed: %r", task.exception())


def setup_logging(verbose: bool = False) -> None:
    """Progress (this logger, INFO) to stderr; the libraries' warnings only if *verbose*:
    the pools log every lost connection at WARNING, expected here and counted anyway."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = logging.WARNING if verbose else logging.ERROR
    root.setLevel(level)
    for name in ("psycopg", "psycopg.pool", "sqlalchemy", "asyncpg"):
        logging.getLogger(name).setLevel(level)  # psycopg pins its logger at WARNING
    log.setLevel(logging.INFO)


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class WrongAnswer(Exception):
    """A read returned something other than EXPECTED."""


def check_answer(value: Any) -> None:
    if value != EXPECTED:
        raise WrongAnswer(f"{QUERY!r} returned {value!r}, expected {EXPECTED!r}")
