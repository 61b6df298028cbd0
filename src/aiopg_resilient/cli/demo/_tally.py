"""What one run measured, from what the application was told and what the server holds.

Pure: no I/O. `tally` takes the operations a workload recorded (each with the outcome the
application saw), the number of rows the server holds for each write id, and the faults
that hit the run; it returns a `Result`. Times are seconds since the run started.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FaultMark",
    "Op",
    "OpKind",
    "Outcome",
    "Result",
    "percentile",
    "recovery",
    "tally",
]

OpKind = Literal["read", "write"]

Outcome = Literal["ok", "failed", "unknown"]
"""What the application was told: it worked; it failed; it may or may not have been applied
(`CommitUnknown`, which says so)."""


@dataclass(frozen=True)
class Op:
    """One operation of the workload, as the application saw it."""

    kind: OpKind
    op_id: int
    """Unique in the run; for a write, the id of the row it inserts."""
    began: float
    ended: float
    outcome: Outcome
    error: str | None = None
    """The error the application saw (class and first line), if any."""


@dataclass(frozen=True)
class FaultMark:
    """One fault as it happened in a run."""

    key: str
    began: float
    ended: float
    """When it was over: the server back up after a restart or a crash; for the others,
    the moment it happened."""
    fired: bool = True
    """False when the fault could not be staged (no COMMIT came by to lose its reply)."""
    detail: str = ""


@dataclass(frozen=True)
class Result:
    """The measures of one contender's run."""

    key: str
    label: str
    operations: int
    reads: int
    writes: int
    read_errors: int
    write_errors: int
    doubled: int
    """Write ids the server holds more than once."""
    lost: int
    """Writes reported OK that the server does not hold."""
    failed_applied: int
    """Writes reported failed that the server holds."""
    in_doubt: int
    """Writes the application was told may or may not have been applied (`CommitUnknown`);
    counted in `write_errors` too."""
    p99: float | None
    """99th percentile of the operations' durations, in seconds (None: no operation)."""
    recovery: tuple[float | None, ...]
    """Per fault that fired, seconds from its end to the first success of an operation
    begun after it began (`recovery`); None when none succeeded before the run ended."""
    error_messages: tuple[tuple[str, int], ...] = ()
    """The errors the application saw, most frequent first, with their counts."""

    @property
    def errors(self) -> int:
        """Errors the application saw, reads and writes."""
        return self.read_errors + self.write_errors

    @property
    def worst_recovery(self) -> float | None:
        """The longest recovery; None if there was no fault, or one it never recovered from
        (see `recovered`)."""
        if not self.recovery or not self.recovered:
            return None
        return max(r for r in self.recovery if r is not None)

    @property
    def recovered(self) -> bool:
        """Whether an operation succeeded after every fault."""
        return all(r is not None for r in self.recovery)

    @property
    def kept_promise(self) -> bool:
        """No error seen, no write doubled, lost, or reported failed yet applied."""
        return (
            self.operations > 0
            and self.errors == 0
            and self.doubled == 0
            and self.lost == 0
            and self.failed_applied == 0
        )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` percentile (0 < q <= 100) of `values`, nearest rank; None when empty."""
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def recovery(ops: Iterable[Op], fault: FaultMark) -> float | None:
    """Seconds from the end of `fault` to the first success, after it ended, of an operation
    begun after it began; None if there was none."""
    ends = [
        op.ended
        for op in ops
        if op.outcome == "ok" and op.began >= fault.began and op.ended >= fault.ended
    ]
    return min(ends) - fault.ended if ends else None


def tally(
    key: str,
    label: str,
    ops: Sequence[Op],
    applied: Mapping[int, int],
    faults: Sequence[FaultMark] = (),
) -> Result:
    """Measure a run: `ops` as the application saw them, `applied` the number of rows the
    server holds per write id (ids it does not hold may be left out)."""
    reads = [op for op in ops if op.kind == "read"]
    writes = [op for op in ops if op.kind == "write"]
    messages = collections.Counter(op.error for op in ops if op.error is not None)
    return Result(
        key=key,
        label=label,
        operations=len(ops),
        reads=len(reads),
        writes=len(writes),
        read_errors=sum(op.outcome != "ok" for op in reads),
        write_errors=sum(op.outcome != "ok" for op in writes),
        doubled=sum(count > 1 for count in applied.values()),
        lost=sum(op.outcome == "ok" and applied.get(op.op_id, 0) == 0 for op in writes),
        failed_applied=sum(
            op.outcome == "failed" and applied.get(op.op_id, 0) > 0 for op in writes
        ),
        in_doubt=sum(op.outcome == "unknown" for op in writes),
        p99=percentile([op.ended - op.began for op in ops], 99),
        recovery=tuple(recovery(ops, fault) for fault in faults if fault.fired),
        error_messages=tuple(messages.most_common()),
    )
