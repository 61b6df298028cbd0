"""Staging the faults: real ones, on the throwaway server and the TLS-terminating proxy.

The proxy terminates TLS, so a cut gives the client the real ``SSL connection has been
closed unexpectedly``, and it sees the protocol in plaintext, so it can let a COMMIT through
and cut the session before the reply comes back: the lost COMMIT reply fires on a write in
every run, whatever the timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from ...testing import ChaosProxy, PostgresServer
from ._plan import Plan
from ._tally import FaultMark

__all__ = ["LOST_COMMIT_WAIT", "Bed", "inject", "run_schedule"]

LOST_COMMIT_WAIT = 10.0
"""Seconds the lost-COMMIT fault waits for a COMMIT to come by before giving up."""


@dataclass(frozen=True)
class Bed:
    """Where a run's faults happen: the server, the proxy in front of it, and the
    application_name of the run's connections."""

    pg: PostgresServer
    proxy: ChaosProxy
    app_name: str


async def _lost_commit(bed: Bed, clock: Callable[[], float]) -> FaultMark:
    trigger = await anyio.to_thread.run_sync(
        lambda: bed.proxy.on_client_message(b"COMMIT", "cut_after")
    )
    try:
        await trigger.wait(LOST_COMMIT_WAIT)
    except TimeoutError:
        await anyio.to_thread.run_sync(trigger.remove)
        now = clock()
        return FaultMark("lost-commit", now, now, False, f"no COMMIT in {LOST_COMMIT_WAIT:g} s")
    now = clock()
    return FaultMark("lost-commit", now, now, True, "COMMIT forwarded, reply cut")


async def inject(key: str, bed: Bed, clock: Callable[[], float]) -> FaultMark:
    """Stage the fault `key` now; return when it is over (the server back up after a
    restart or a crash)."""
    if key == "lost-commit":
        return await _lost_commit(bed, clock)
    began = clock()
    if key == "cut":
        n = await anyio.to_thread.run_sync(bed.proxy.cut)
        detail = f"{n} sessions closed"
    elif key == "terminate":
        n = await bed.pg.terminate_backends(bed.app_name)
        detail = f"{n} backends terminated"
    elif key in ("restart", "crash"):
        if key == "restart":
            await bed.pg.restart("fast")
        else:
            await bed.pg.stop("immediate")
            await bed.pg.start()
        detail = f"server back up after {clock() - began:.2f} s"
    else:
        raise ValueError(f"unknown fault {key!r}")
    return FaultMark(key, began, clock(), True, detail)


async def run_schedule(
    plan: Plan, bed: Bed, clock: Callable[[], float], on_mark: Callable[[FaultMark], None]
) -> list[FaultMark]:
    """Stage `plan`'s faults at their offsets (each after the one before it is over);
    call `on_mark` after each; return them all."""
    marks: list[FaultMark] = []
    for key, due in plan.schedule:
        await anyio.sleep(max(0.0, due - clock()))
        mark = await inject(key, bed, clock)
        marks.append(mark)
        on_mark(mark)
    return marks
