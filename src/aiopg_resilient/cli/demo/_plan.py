"""The demo's plan: which faults, when, how long each run lasts, how many workers. Pure.

Each contender runs for `Plan.run_seconds` under the same schedule: the faults in the order
given, at the same offsets from the start of its run (a fault waits for the one before it
to be over, so a restart that takes a second shifts the ones after it, the same way in
every run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FAULT_KINDS", "MIN_SECONDS", "FaultKind", "Plan", "fault_kind", "parse_faults"]

MIN_SECONDS = 3.0
"""The shortest ``--seconds`` (one second a run)."""


@dataclass(frozen=True)
class FaultKind:
    """One kind of fault the demo stages."""

    key: str
    label: str
    what: str


FAULT_KINDS: tuple[FaultKind, ...] = (
    FaultKind(
        "cut",
        "TLS proxy cut",
        "the proxy closes every session: 'SSL connection has been closed unexpectedly'",
    ),
    FaultKind(
        "terminate",
        "backend terminated",
        "pg_terminate_backend() on every backend of the run",
    ),
    FaultKind(
        "lost-commit",
        "lost COMMIT reply",
        "the proxy forwards a write's COMMIT, then cuts the session before the reply",
    ),
    FaultKind("restart", "restart", "pg_ctl restart -m fast"),
    FaultKind("crash", "crash", "stop -m immediate, then start: crash recovery"),
)

_BY_KEY = {kind.key: kind for kind in FAULT_KINDS}


def fault_kind(key: str) -> FaultKind:
    """The `FaultKind` named `key` (KeyError if there is none)."""
    return _BY_KEY[key]


def parse_faults(text: str) -> tuple[str, ...]:
    """``"cut,crash"`` -> ``("cut", "crash")``; ``"all"`` -> every fault; ValueError on an
    unknown or repeated name, or none."""
    if text.strip() == "all":
        return tuple(kind.key for kind in FAULT_KINDS)
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    if not keys:
        raise ValueError("name at least one fault")
    unknown = [key for key in keys if key not in _BY_KEY]
    if unknown:
        known = ", ".join(kind.key for kind in FAULT_KINDS)
        raise ValueError(f"unknown fault {unknown[0]!r} (known: {known}, or all)")
    if len(set(keys)) != len(keys):
        raise ValueError("each fault at most once")
    return keys


@dataclass(frozen=True)
class Plan:
    """What every run does: `workers` tasks for `run_seconds` (at least), `faults` at
    `offsets`."""

    run_seconds: float
    faults: tuple[str, ...]
    workers: int = 8
    write_share: float = 0.25
    """The share of operations that are writes (the rest are reads)."""
    pause: float = 0.01
    """Seconds each worker waits between two operations."""

    @classmethod
    def for_total(cls, seconds: float, faults: Sequence[str], workers: int = 8) -> Plan:
        """A plan whose three runs last about `seconds` in all."""
        if seconds < MIN_SECONDS:
            raise ValueError(f"--seconds must be at least {MIN_SECONDS:g}")
        if not 1 <= workers <= 64:
            raise ValueError("--workers must be between 1 and 64")
        return cls(run_seconds=seconds / 3, faults=tuple(faults), workers=workers)

    @property
    def offsets(self) -> tuple[float, ...]:
        """When each fault is due, in seconds from the start of a run: evenly spread, the
        last one as far from the end as the first is from the start."""
        n = len(self.faults)
        return tuple(round(self.run_seconds * (k + 1) / (n + 1), 2) for k in range(n))

    @property
    def schedule(self) -> tuple[tuple[str, float], ...]:
        """``(fault, offset)`` pairs, in order."""
        return tuple(zip(self.faults, self.offsets, strict=True))

    @property
    def settle(self) -> float:
        """How long a run goes on after its last fault is over (to see the recovery)."""
        return max(0.5, min(2.0, self.run_seconds / (len(self.faults) + 1)))
