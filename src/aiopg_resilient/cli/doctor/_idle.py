"""``--probe-idle``: hold connections idle, test each once, see when the path kills them.

The plan and the verdict are in `._idle_logic`; this module opens the connections (a few
at a time), sleeps until each is due, tests it with ``SELECT 1`` and closes it. The probe
connections have TCP keepalives off, so only the idle timeout of the path is measured;
one more has keepalives every second, to tell whether TCP keepalives would keep them.
"""

from __future__ import annotations

import contextlib
import logging
import time

import anyio
import psycopg

from ..._driver import DriverConnection
from ._idle_logic import KEEPALIVE_PROBE_IDLE, bracket, plan, should_stop
from ._model import IdleCheck, IdleResult, Target
from ._probe import APPLICATION_NAME, connect, connect_timeout, short_error
from ._target import Dsn

__all__ = ["probe_idle"]

logger = logging.getLogger("aiopg_resilient.doctor")

_OPENING = 4
"""Connections being opened at once: the probe never storms the server."""


class _Held:
    def __init__(self, planned: float) -> None:
        self.planned = planned
        self.conn: DriverConnection | None = None
        self.since = 0.0
        self.error: str | None = None


async def _open(held: _Held, conninfo: str, timeout: float, limiter: anyio.CapacityLimiter) -> None:
    async with limiter:
        try:
            held.conn = await connect(conninfo, timeout)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            held.error = short_error(exc)
        held.since = time.monotonic()


async def _test(held: _Held, timeout: float) -> IdleCheck:
    """Test *held* once; close it."""
    conn = held.conn
    assert conn is not None
    idle = time.monotonic() - held.since
    alive, reason = True, None
    try:
        with anyio.fail_after(timeout):
            await conn.execute("SELECT 1")
    except TimeoutError:
        alive, reason = False, f"no answer within {timeout:g} s (dropped silently)"
    except (psycopg.Error, OSError) as exc:
        alive, reason = False, short_error(exc)
    finally:
        await _close(held)
    logger.debug("idle probe: %.2f s idle: %s", idle, "alive" if alive else reason)
    return IdleCheck(planned=held.planned, idle=idle, alive=alive, reason=reason)


async def _close(held: _Held) -> None:
    conn, held.conn = held.conn, None
    if conn is not None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await conn.close()


async def probe_idle(
    dsn: Dsn, target: Target, sslmode: str, seconds: float, timeout: float
) -> IdleResult:
    """Measure after how long *target*'s path kills idle connections (up to *seconds*)."""
    base = {
        "application_name": APPLICATION_NAME,
        "connect_timeout": connect_timeout(dsn, timeout),
        "sslmode": sslmode,
    }
    quiet = dsn.for_target(target, **base, keepalives="0")
    chatty = dsn.for_target(
        target,
        **base,
        keepalives="1",
        keepalives_idle=str(KEEPALIVE_PROBE_IDLE),
        keepalives_interval="1",
        keepalives_count="5",
    )
    rungs = [_Held(t) for t in plan(seconds)]
    keeper = _Held(seconds)
    checks: list[IdleCheck] = []
    try:
        limiter = anyio.CapacityLimiter(_OPENING)
        async with anyio.create_task_group() as tg:
            for held in (*rungs, keeper):
                tg.start_soon(
                    _open, held, quiet if held is not keeper else chatty, timeout, limiter
                )
        failed = [held.error for held in (*rungs, keeper) if held.error]
        if failed:
            error = f"{len(failed)} of {len(rungs) + 1} connections failed to open: {failed[0]}"
            return IdleResult(target.label, seconds, (), None, None, error=error)
        logger.info("idle probe: %d connections open, testing up to %g s", len(rungs), seconds)
        for held in sorted(rungs, key=lambda h: h.since + h.planned):
            await anyio.sleep(max(0.0, held.since + held.planned - time.monotonic()))
            checks.append(await _test(held, timeout))
            if should_stop(checks):
                break
        last_alive, first_dead = bracket(checks)
        keepalive_alive = keepalive_idle = None
        if first_dead is not None:
            keepalive_idle = time.monotonic() - keeper.since
            keepalive_alive = (await _test(keeper, timeout)).alive
        return IdleResult(
            target.label,
            seconds,
            tuple(checks),
            last_alive,
            first_dead,
            keepalive_alive=keepalive_alive,
            keepalive_idle=keepalive_idle,
        )
    finally:
        for held in (*rungs, keeper):
            await _close(held)
