"""Running the demo: one throwaway server, then each contender in turn under the same faults.

Each run gets a fresh TLS-terminating proxy in front of the server and its own
application_name; after it, the rows each write id left on the server are counted and the
run is measured (`tally`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio
from psycopg import sql

from ...testing import ChaosProxy, PostgresServer, ServerUnavailable
from ._contenders import TABLE, Client, Contender
from ._faults import Bed, run_schedule
from ._plan import Plan, fault_kind
from ._progress import LogCapture, Progress
from ._tally import FaultMark, Result, tally
from ._workload import Live, run_workers

__all__ = ["Run", "Session", "open_server"]

logger = logging.getLogger("aiopg_resilient.demo")

_TICK = 0.2
_BACKENDS: tuple[Literal["local", "docker"], ...] = ("local", "docker")


def _reason(exc: ServerUnavailable) -> str:
    """What `ServerUnavailable` says was missing, without its generic advice."""
    found = re.search(r"for tests \((.*)\):", str(exc))
    return found.group(1) if found else str(exc)


async def open_server() -> PostgresServer:
    """Start a throwaway PostgreSQL with ``ssl=on`` that the demo can restart and crash:
    from the local server binaries, else in Docker. Raises `ServerUnavailable` saying why
    neither works, one reason a line."""
    reasons: list[str] = []
    for backend in _BACKENDS:
        pg = PostgresServer(backend=backend)
        try:
            await pg.open()
        except ServerUnavailable as exc:
            reasons.append(_reason(exc))
            continue
        return pg
    raise ServerUnavailable("\n".join(reasons))


@dataclass
class Run:
    """One contender's run: its measures, its faults as they happened, what it noted."""

    result: Result
    marks: list[FaultMark]
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every fault of the plan was staged."""
        return all(m.fired for m in self.marks)


def _applied_query() -> sql.Composed:
    return sql.SQL("SELECT op_id, count(*) FROM {} WHERE contender = %s GROUP BY op_id").format(
        sql.Identifier(TABLE)
    )


class Session:
    """The demo on one server: `prepare` it, then `run` each contender."""

    def __init__(
        self, pg: PostgresServer, plan: Plan, progress: Progress, logs: LogCapture, *, verbose: bool
    ) -> None:
        self.pg = pg
        self.plan = plan
        self.progress = progress
        self.logs = logs
        self.verbose = verbose

    async def prepare(self) -> str:
        """Create the table the writes go to; return the server's version."""
        await self.pg.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (contender text NOT NULL, "
                "op_id bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(TABLE))
        )
        return str((await self.pg.execute("SHOW server_version"))[0][0])

    async def run(self, index: int, contender: Contender) -> Run:
        """Run the workload through `contender` under the plan's faults, and measure it."""
        say = self.progress
        say.line(f"[{index}/3] {contender.label}: {contender.how}")
        app_name = f"aiopg-demo-{contender.key}"
        live = Live()
        async with ChaosProxy.for_server(self.pg, tls=True) as proxy:
            dsn = self.pg.conninfo(host=proxy.host, port=proxy.port, application_name=app_name)
            async with contender.open(dsn, self.plan.workers) as opened:
                marks = await self._under_faults(
                    Bed(self.pg, proxy, app_name), opened.clients, live, contender.label
                )
                notes = opened.notes()
        say.clear()
        rows = await self.pg.execute(_applied_query(), (contender.key,))
        applied = {int(op_id): int(n) for op_id, n in rows}
        ops = live.recorded
        result = tally(contender.key, contender.label, ops, applied, marks)
        logger.info(
            "demo run %s: %d operations, %d write ids on the server, faults %s",
            contender.key,
            result.operations,
            len(applied),
            [m.key for m in marks if m.fired],
        )
        say.line(
            f"    done: {result.operations:,} operations, {result.errors:,} errors the "
            f"application saw, {len(applied):,} write ids on the server"
        )
        for note in notes:
            say.line(f"    {note}")
        self.flush_logs()
        return Run(result, marks, notes)

    async def _under_faults(
        self, bed: Bed, clients: Sequence[Client], live: Live, label: str
    ) -> list[FaultMark]:
        plan = self.plan
        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        def on_mark(mark: FaultMark) -> None:
            name = fault_kind(mark.key).label
            state = mark.detail if mark.fired else f"did not happen: {mark.detail}"
            self.progress.line(f"    {mark.ended:6.1f} s  {name}: {state}")

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_workers, clients, plan, clock, stop, live)
            tg.start_soon(self._ticker, label, clock, stop, live)
            marks = await run_schedule(plan, bed, clock, on_mark)
            last = marks[-1].ended if marks else 0.0
            await anyio.sleep(max(0.0, max(plan.run_seconds, last + plan.settle) - clock()))
            stop.set()
        return marks

    async def _ticker(
        self, label: str, clock: Callable[[], float], stop: anyio.Event, live: Live
    ) -> None:
        # Bounded: a run never lasts an hour (each fault and operation has a deadline).
        for _ in range(int(3600 / _TICK)):
            if stop.is_set():
                return
            self.progress.status(
                f"    {label}: {clock():5.1f} s of {self.plan.run_seconds:.0f}, "
                f"{live.ops:,} operations, {live.errors:,} errors"
            )
            await anyio.sleep(_TICK)

    def flush_logs(self) -> None:
        """Show the library's log lines held so far (``--verbose``), or say how many."""
        lines = self.logs.take()
        if not lines:
            return
        if self.verbose:
            self.progress.line(f"    the library's log during this run ({len(lines)} lines):")
            for line in lines:
                self.progress.line(f"      {line}")
        else:
            self.progress.line(
                f"    ({len(lines)} log lines of the library held back; --verbose shows them)"
            )
