"""The demo's final table, and its results for machines (``--json``). Pure: text in, text out.

The table is side by side: one column a contender, one row a measure::

                                      plain psycopg    usual advice   ResilientPool
    operations                                4,812           4,630           5,102
    errors the application saw                   41               0               0
    ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from ._plan import Plan, fault_kind
from ._tally import FaultMark, Result

__all__ = ["ROWS", "render_table", "report_json"]

_LABEL_WIDTH = 32
_COLUMN_WIDTH = 16


def _count(n: int) -> str:
    return f"{n:,}"


def _errors(result: Result) -> str:
    if result.in_doubt:
        return f"{result.errors:,} ({result.in_doubt:,} in doubt)"
    return _count(result.errors)


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _recovery(result: Result) -> str:
    if not result.recovery:
        return "-"
    if not result.recovered:
        return "never"
    return _latency(result.worst_recovery)


ROWS: tuple[tuple[str, Callable[[Result], str]], ...] = (
    ("operations", lambda r: _count(r.operations)),
    ("  of which writes", lambda r: _count(r.writes)),
    ("errors the application saw", _errors),
    ("doubled writes", lambda r: _count(r.doubled)),
    ("lost writes (reported OK)", lambda r: _count(r.lost)),
    ("writes reported failed, applied", lambda r: _count(r.failed_applied)),
    ("p99 latency", lambda r: _latency(r.p99)),
    ("recovery (worst fault)", _recovery),
)
"""Each row of the table: its label, and how a result's cell reads."""


def render_table(results: Sequence[Result]) -> str:
    """The side-by-side table of `results` (one column each), without a trailing newline."""
    grid = [("", [r.label for r in results])]
    grid += [(label, [cell(r) for r in results]) for label, cell in ROWS]
    width = max([_COLUMN_WIDTH, *(len(c) + 2 for _, cells in grid for c in cells)])
    return "\n".join(
        label.ljust(_LABEL_WIDTH) + "".join(c.rjust(width) for c in cells) for label, cells in grid
    )


def _run_json(result: Result, marks: Sequence[FaultMark], notes: Sequence[str]) -> dict[str, Any]:
    data = asdict(result)
    data["errors"] = result.errors
    data["p99_ms"] = None if result.p99 is None else round(result.p99 * 1000, 1)
    del data["p99"]
    data["recovery_s"] = [None if r is None else round(r, 3) for r in result.recovery]
    del data["recovery"]
    worst = result.worst_recovery
    data["worst_recovery_s"] = None if worst is None else round(worst, 3)
    data["kept_promise"] = result.kept_promise
    data["error_messages"] = [{"error": e, "count": n} for e, n in result.error_messages]
    data["faults"] = [
        {
            "key": m.key,
            "began_s": round(m.began, 3),
            "ended_s": round(m.ended, 3),
            "fired": m.fired,
            "detail": m.detail,
        }
        for m in marks
    ]
    data["notes"] = list(notes)
    return data


def report_json(
    plan: Plan,
    results: Sequence[Result],
    marks: Mapping[str, Sequence[FaultMark]],
    notes: Mapping[str, Sequence[str]],
    server: Mapping[str, Any],
    *,
    exit_status: int,
) -> dict[str, Any]:
    """The results for ``--json``: the plan, the server, each run's measures and faults."""
    return {
        "plan": {
            "order": "one after the other, the same faults at the same offsets",
            "run_seconds": round(plan.run_seconds, 2),
            "workers": plan.workers,
            "write_share": plan.write_share,
            "faults": [
                {
                    "key": key,
                    "label": fault_kind(key).label,
                    "what": fault_kind(key).what,
                    "due_s": due,
                }
                for key, due in plan.schedule
            ],
        },
        "server": dict(server),
        "runs": [_run_json(r, marks.get(r.key, ()), notes.get(r.key, ())) for r in results],
        "exit_status": exit_status,
    }


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


_WRITE_PROBLEMS = (
    (
        "doubled",
        "applied twice: the server applied a COMMIT whose reply was lost, and the retry ran "
        "the write again",
    ),
    ("lost", "reported OK but not on the server"),
    ("failed_applied", "reported failed but applied (retrying them by hand would double them)"),
    ("in_doubt", "ended in CommitUnknown (the server could not tell whether it committed)"),
)


def findings(results: Sequence[Result], *, top: int = 3) -> list[str]:
    """What each run's numbers mean, in words: only what was measured."""
    lines: list[str] = []
    for r in results:
        for attribute, what in _WRITE_PROBLEMS:
            n = getattr(r, attribute)
            if n:
                lines.append(f"{r.label}: {_plural(n, 'write')} {what}")
        if r.errors:
            lines.append(f"{r.label}: {_plural(r.errors, 'error')} reached the application:")
            lines += [f"    {n:,} x {message}" for message, n in r.error_messages[:top]]
            rest = sum(n for _, n in r.error_messages[top:])
            if rest:
                lines.append(f"    {rest:,} x other errors")
    return lines


def verdict(results: Sequence[Result], *, complete: bool, pool_key: str = "pool") -> str | None:
    """Why the demo failed, or None: every fault was staged and the pool kept its promise
    (operations done; no error, no write doubled, lost, or reported failed yet applied)."""
    pool = next((r for r in results if r.key == pool_key), None)
    if not complete:
        return "not every fault could be staged: the comparison is incomplete"
    if pool is None:
        return "ResilientPool did not run"
    if not pool.kept_promise:
        return (
            f"{pool.label} did not keep its promise ({pool.operations:,} operations, "
            f"{pool.errors:,} errors, {pool.doubled:,} doubled, {pool.lost:,} lost, "
            f"{pool.failed_applied:,} reported failed yet applied): please report this, "
            "with this output, as a bug"
        )
    return None
