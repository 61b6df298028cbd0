"""``--probe-idle``: the plan, the bracket, the verdict. Pure.

A connection can be tested for life only once: the test itself is traffic, which resets
the idle timer of whatever is counting. So the probe opens one connection per rung of a
geometric ladder of idle times (ratio at most `RATIO`, at most `MOST` connections, the
top rung the asked-for duration), tests connection *i* once after *t_i* seconds of
silence, and stops after two dead ones in a row. The path's idle timeout lies between
the last connection found alive and the first found dead; with a ratio of 1.15 the middle
of that bracket is within 7.5 % of either end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._model import Finding, IdleCheck, IdleResult, Severity
from ._units import heartbeat_below, seconds_text

__all__ = ["MOST", "RATIO", "assess_idle", "bracket", "keepalive_below", "plan", "should_stop"]

RATIO = 1.15
MOST = 40
FLOOR = 0.5
"""The shortest idle time worth testing (seconds), when the ladder has room for it."""
KEEPALIVE_PROBE_IDLE = 1
"""keepalives_idle (s) of the probe's one keepalive connection."""


def plan(seconds: float, *, ratio: float = RATIO, most: int = MOST) -> tuple[float, ...]:
    """The idle times to test, shortest first, the last one *seconds*."""
    if seconds <= FLOOR:
        return (seconds,)
    count = min(most, int(math.log(seconds / FLOOR) / math.log(ratio)) + 1)
    count = max(count, 2)
    return tuple(seconds / ratio ** (count - 1 - i) for i in range(count))


def should_stop(checks: Sequence[IdleCheck]) -> bool:
    """Two dead connections in a row (in plan order) settle it."""
    return len(checks) >= 2 and not checks[-1].alive and not checks[-2].alive


def bracket(checks: Sequence[IdleCheck]) -> tuple[float | None, float | None]:
    """(last alive, first dead) in measured idle seconds: the first dead is where the
    run of dead connections that ends the probe begins; None when none died (or none
    lived)."""
    ordered = sorted(checks, key=lambda c: c.idle)
    first_dead = None
    for check in reversed(ordered):
        if check.alive:
            break
        first_dead = check.idle
    alive = [c.idle for c in ordered if c.alive and (first_dead is None or c.idle < first_dead)]
    return (max(alive) if alive else None), first_dead


def keepalive_below(limit: float) -> int:
    """A ``keepalives_idle`` (whole seconds, at least 1) well under *limit* seconds."""
    return max(1, min(10, int(limit // 3)))


def assess_idle(result: IdleResult, keepalives_idle: int, heartbeat: float) -> list[Finding]:
    """The verdict of the idle probe, with the settings that keep connections."""
    label = result.host
    if result.error:
        return [
            Finding(
                "idle.cut", Severity.INFO, "the idle probe could not run", result.error, host=label
            )
        ]
    alive = [c for c in result.checks if c.alive]
    longest = max((c.idle for c in alive), default=0.0)
    if result.first_dead is None:
        return [
            Finding(
                "idle.cut",
                Severity.OK,
                f"no idle cut: connections idle {seconds_text(round(longest, 1))} "
                "(keepalives off) are alive",
                f"{len(result.checks)} connections tested once each after "
                f"{result.checks[0].idle:.1f} s to {longest:.1f} s of silence"
                if result.checks
                else "",
                host=label,
            )
        ]
    low = result.last_alive or 0.0
    high = result.first_dead
    middle = result.middle or high
    reasons = sorted({c.reason for c in result.checks if not c.alive and c.reason})
    by_server = any("idle-session timeout" in r or "57P05" in r for r in reasons)
    killer = "the server's idle_session_timeout" if by_server else "something in the path"
    evidence = (
        f"connections held idle with keepalives off: alive after {low:.1f} s, dead after "
        f"{high:.1f} s ({'; '.join(reasons) or 'no reason given'})"
    )
    conninfo: dict[str, int] = {}
    pool = {}
    beat = heartbeat_below(low or high / 2)
    if beat < heartbeat:
        pool["heartbeat_interval"] = beat
    keep = keepalive_below(low or high / 2)
    if result.keepalive_alive is True:
        evidence += (
            f"; one with keepalives every {KEEPALIVE_PROBE_IDLE} s was alive after "
            f"{result.keepalive_idle or 0:.1f} s: TCP keepalives keep the path open"
        )
        if keep < keepalives_idle:
            conninfo["keepalives_idle"] = keep
        action = (
            f"keepalives_idle={keep} (TCP keepalives keep it open) and the pool's "
            f"heartbeat_interval={beat:g} (ResilientPool pings idle connections)"
        )
    elif result.keepalive_alive is False:
        evidence += (
            f"; one with keepalives every {KEEPALIVE_PROBE_IDLE} s died too: TCP keepalives "
            "do not reach whatever cuts (a proxy that ends TCP, or the server itself)"
        )
        action = (
            f"only traffic keeps these connections: the pool's heartbeat_interval={beat:g} "
            "(ResilientPool pings idle connections); raise the timeout where it is set"
        )
    else:
        action = f"keepalives_idle={keep} and the pool's heartbeat_interval={beat:g}"
        if keep < keepalives_idle:
            conninfo["keepalives_idle"] = keep
    return [
        Finding(
            "idle.cut",
            Severity.WARNING,
            f"{killer} cuts connections idle for ~{middle:.1f} s (between {low:.1f} and "
            f"{high:.1f} s)",
            evidence,
            action,
            host=label,
            conninfo=conninfo,
            pool=pool,
        )
    ]
