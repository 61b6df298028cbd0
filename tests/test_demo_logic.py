"""`aiopg-resilient demo`, the pure parts: counting what happened to the writes, the
recovery after each fault, the table, the verdict, the plan, the output plumbing. No server,
no event loop."""

from __future__ import annotations

import io
import json
import logging

import pytest

from aiopg_resilient.cli import EXIT_USAGE, main
from aiopg_resilient.cli.demo._plan import FAULT_KINDS, Plan, parse_faults
from aiopg_resilient.cli.demo._progress import Progress, capture_logs
from aiopg_resilient.cli.demo._table import ROWS, findings, render_table, report_json, verdict
from aiopg_resilient.cli.demo._tally import FaultMark, Op, Result, percentile, recovery, tally


def _read(op_id: int, began: float, ended: float, ok: bool = True) -> Op:
    return Op("read", op_id, began, ended, "ok" if ok else "failed", None if ok else "E: x")


def _write(op_id: int, outcome: str = "ok", began: float = 0.0, ended: float = 0.01) -> Op:
    error = None if outcome == "ok" else f"OperationalError: {outcome}"
    return Op("write", op_id, began, ended, outcome, error)  # type: ignore[arg-type]


def _result(key: str = "pool", **changes: object) -> Result:
    base: dict[str, object] = {
        "key": key,
        "label": {"plain": "plain psycopg", "advice": "usual advice"}.get(key, "ResilientPool"),
        "operations": 100,
        "reads": 75,
        "writes": 25,
        "read_errors": 0,
        "write_errors": 0,
        "doubled": 0,
        "lost": 0,
        "failed_applied": 0,
        "in_doubt": 0,
        "p99": 0.05,
        "recovery": (0.1, 0.2),
    }
    base.update(changes)
    return Result(**base)  # type: ignore[arg-type]


# -- counting -----------------------------------------------------------------------------


def test_tally_counts_what_the_server_holds_against_what_the_app_was_told() -> None:
    """Doubled: an id held twice; lost: reported OK, absent; failed yet applied: reported
    failed, held; a failed write that is absent is a correct error, not counted."""
    ops = [
        _write(1),  # OK, held once: fine
        _write(2),  # OK, held twice: doubled
        _write(3),  # OK, absent: lost
        _write(4, "failed"),  # failed, held: failed yet applied
        _write(5, "failed"),  # failed, absent: a true error
        _write(6, "unknown"),  # CommitUnknown, held: it said it might be
        _read(7, 0.0, 0.01),
        _read(8, 0.0, 0.01, ok=False),
    ]
    result = tally("advice", "usual advice", ops, {1: 1, 2: 2, 4: 1, 6: 1})
    assert (result.operations, result.reads, result.writes) == (8, 2, 6)
    assert (result.doubled, result.lost, result.failed_applied, result.in_doubt) == (1, 1, 1, 1)
    assert (result.read_errors, result.write_errors, result.errors) == (1, 3, 4)
    assert dict(result.error_messages) == {
        "OperationalError: failed": 2,
        "OperationalError: unknown": 1,
        "E: x": 1,
    }
    assert result.error_messages[0] == ("OperationalError: failed", 2)
    assert not result.kept_promise


def test_a_clean_run_keeps_the_promise_and_an_empty_one_does_not() -> None:
    """No error, nothing doubled or lost: kept; no operation at all proves nothing."""
    clean = tally("pool", "ResilientPool", [_write(1), _read(2, 0, 0.1)], {1: 1})
    assert clean.kept_promise
    assert not tally("pool", "ResilientPool", [], {}).kept_promise


def test_percentile_is_nearest_rank() -> None:
    """p99 of 1..100 is 99, of 1..10 is 10; nothing gives None; q outside (0, 100] fails."""
    assert percentile([float(v) for v in range(100, 0, -1)], 99) == 99.0
    assert percentile([float(v) for v in range(1, 11)], 99) == 10.0
    assert percentile([3.0], 50) == 3.0
    assert percentile([], 99) is None
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 0)


def test_recovery_is_the_first_success_begun_after_the_fault_and_ended_after_its_end() -> None:
    """An operation begun before the fault, or over before the server was back, does not
    count; failures do not count; none at all is None."""
    fault = FaultMark("crash", began=10.0, ended=11.0)
    ops = [
        _read(1, 9.9, 11.05),  # begun before the fault
        _read(2, 10.01, 10.02),  # over before the server was back
        _read(3, 10.5, 11.2, ok=False),  # failed
        _read(4, 10.6, 11.3),  # waited through the outage: 0.3 s
        _read(5, 11.1, 11.15),  # the first success after the end: 0.15 s
    ]
    assert recovery(ops, fault) == pytest.approx(0.15)
    assert recovery(ops[:3], fault) is None


def test_recovery_per_fault_skips_faults_that_did_not_happen() -> None:
    """A fault that could not be staged has no recovery; the worst is the longest; one fault
    never recovered from makes the worst unknown."""
    ops = [_read(1, 1.0, 1.2), _read(2, 5.0, 5.5)]
    faults = [
        FaultMark("cut", 1.0, 1.0),
        FaultMark("lost-commit", 3.0, 3.0, fired=False),
        FaultMark("restart", 4.9, 5.1),
    ]
    result = tally("pool", "ResilientPool", ops, {}, faults)
    assert result.recovery == pytest.approx((0.2, 0.4))
    assert result.worst_recovery == pytest.approx(0.4)
    never = tally("pool", "ResilientPool", ops, {}, [*faults, FaultMark("crash", 9, 9.5)])
    assert not never.recovered
    assert never.worst_recovery is None


# -- the table, the findings, the verdict ------------------------------------------------


def test_table_has_every_row_and_one_aligned_column_per_contender() -> None:
    """Every measure is a row, every contender a right-aligned column, cells read well."""
    results = [
        _result("plain", operations=4812, read_errors=30, write_errors=11, failed_applied=2),
        _result("advice", doubled=1, p99=1.25, recovery=(0.1, None)),
        _result("pool", recovery=(0.05, 0.3), write_errors=1, in_doubt=1),
    ]
    lines = render_table(results).splitlines()
    assert len(lines) == 1 + len(ROWS)
    assert lines[0].split() == ["plain", "psycopg", "usual", "advice", "ResilientPool"]
    assert [line[:32].rstrip() for line in lines[1:]] == [label for label, _ in ROWS]
    assert len({len(line) for line in lines}) == 1  # every cell right-aligned to one edge
    rows = {line[:32].strip(): line[32:].split("  ") for line in lines[1:]}
    cells = {k: [c.strip() for c in v if c.strip()] for k, v in rows.items()}
    assert cells["operations"] == ["4,812", "100", "100"]
    assert cells["errors the application saw"] == ["41", "0", "1 (1 in doubt)"]
    assert cells["doubled writes"] == ["0", "1", "0"]
    assert cells["writes reported failed, applied"] == ["2", "0", "0"]
    assert cells["p99 latency"] == ["50 ms", "1.25 s", "50 ms"]
    assert cells["recovery (worst fault)"] == ["200 ms", "never", "300 ms"]


def test_findings_say_only_what_was_measured() -> None:
    """A clean run has nothing to say; each problem gets its line, errors their messages."""
    assert findings([_result("pool")]) == []
    plain = _result(
        "plain",
        write_errors=5,
        failed_applied=1,
        error_messages=(("OperationalError: SSL", 3), ("AdminShutdown: x", 1), ("E: y", 1)),
    )
    lines = findings([plain, _result("advice", doubled=2, lost=1)], top=2)
    assert lines == [
        "plain psycopg: 1 write reported failed but applied (retrying them by hand would "
        "double them)",
        "plain psycopg: 5 errors reached the application:",
        "    3 x OperationalError: SSL",
        "    1 x AdminShutdown: x",
        "    1 x other errors",
        "usual advice: 2 writes applied twice: the server applied a COMMIT whose reply was "
        "lost, and the retry ran the write again",
        "usual advice: 1 write reported OK but not on the server",
    ]


@pytest.mark.parametrize(
    ("pool", "complete", "expected"),
    [
        ({}, True, None),
        ({}, False, "not every fault"),
        ({"write_errors": 1, "in_doubt": 1}, True, "did not keep its promise"),
        ({"doubled": 1}, True, "did not keep its promise"),
        ({"lost": 1}, True, "did not keep its promise"),
        ({"failed_applied": 1}, True, "did not keep its promise"),
        ({"read_errors": 1}, True, "did not keep its promise"),
        ({"operations": 0}, True, "did not keep its promise"),
    ],
)
def test_verdict_fails_the_demo_when_the_pool_breaks_its_promise(
    pool: dict[str, object], complete: bool, expected: str | None
) -> None:
    """The demo passes only when every fault was staged and the pool was clean; what the
    other contenders did does not decide it."""
    others = [_result("plain", read_errors=9), _result("advice", doubled=3)]
    found = verdict([*others, _result("pool", **pool)], complete=complete)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert expected in found
    assert verdict(others, complete=True) == "ResilientPool did not run"


def test_report_json_is_json_with_the_plan_and_each_run() -> None:
    """``--json`` output: plain JSON, seconds and milliseconds rounded, faults listed."""
    plan = Plan.for_total(12, ("cut", "crash"))
    marks = {"pool": [FaultMark("cut", 1.0, 1.001, True, "8 sessions closed")]}
    report = report_json(
        plan, [_result("pool")], marks, {"pool": ["note"]}, {"version": "15"}, exit_status=0
    )
    data = json.loads(json.dumps(report))
    assert data["plan"]["run_seconds"] == 4.0
    assert [f["key"] for f in data["plan"]["faults"]] == ["cut", "crash"]
    (run,) = data["runs"]
    assert run["p99_ms"] == 50.0
    assert run["recovery_s"] == [0.1, 0.2]
    assert run["kept_promise"] is True
    assert run["faults"][0]["detail"] == "8 sessions closed"
    assert run["notes"] == ["note"]
    assert data["exit_status"] == 0


# -- the plan and the command line --------------------------------------------------------


def test_parse_faults() -> None:
    """``all`` is every fault in order; a list keeps its order; typos and repeats fail."""
    assert parse_faults("all") == tuple(k.key for k in FAULT_KINDS)
    assert parse_faults("crash, cut") == ("crash", "cut")
    for bad, message in (
        ("cut,cutt", "unknown fault 'cutt'"),
        ("cut,cut", "at most once"),
        (" , ", "at least one"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_faults(bad)


def test_plan_spreads_the_faults_over_each_run() -> None:
    """Three runs share --seconds; faults are evenly spread, with room after the last."""
    plan = Plan.for_total(60, parse_faults("all"))
    assert plan.run_seconds == 20
    assert plan.offsets == (3.33, 6.67, 10.0, 13.33, 16.67)
    assert 0.5 <= plan.settle <= 2.0
    with pytest.raises(ValueError, match="at least"):
        Plan.for_total(2, ("cut",))


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--seconds", "1"],
        ["demo", "--faults", "meteor"],
        ["demo", "--workers", "0"],
        ["demo", "--seconds", "nan"],
    ],
)
def test_bad_arguments_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Out-of-range values stop at the command line with exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == EXIT_USAGE
    assert "demo" in capsys.readouterr().err


def test_help_lists_the_options_and_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --help`` names every option and every fault, and the exit statuses."""
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    for word in ("--seconds", "--faults", "--workers", "--json", "--verbose", "exit status"):
        assert word in out
    for kind in FAULT_KINDS:
        assert kind.key in out


# -- output plumbing ----------------------------------------------------------------------


def test_progress_without_a_terminal_writes_plain_lines_only() -> None:
    """Not a terminal: the status is not shown and no ``\\r`` is ever written."""
    out = io.StringIO()
    progress = Progress(out, live=False)
    progress.status("working 1")
    progress.line("a fault")
    progress.status("working 2")
    progress.clear()
    progress.line("done")
    assert out.getvalue() == "a fault\ndone\n"


def test_progress_on_a_terminal_rewrites_the_status_under_the_lines() -> None:
    """On a terminal the status is rewritten in place and moves below each new line."""
    out = io.StringIO()
    progress = Progress(out, live=True)
    progress.status("working 10")
    progress.status("working 9")
    progress.line("a fault")
    progress.clear()
    wipe = "\r" + " " * len("working 9") + "\r"
    assert out.getvalue() == (
        "\rworking 10\rworking 9 " + wipe + "a fault\n" + "\rworking 9" + wipe
    )


def test_library_logs_are_held_back_and_the_loggers_restored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While captured, the library's records reach no other handler (not even Python's
    last resort on stderr); afterwards the loggers are as they were."""
    pool_logger = logging.getLogger("aiopg_resilient.pool")
    top = logging.getLogger("aiopg_resilient")
    before = (top.level, top.propagate, list(top.handlers))
    with capture_logs(logging.INFO) as logs:
        pool_logger.warning("pool %r: lost a connection to %s", "p", "db")
        logging.getLogger("psycopg").info("from psycopg")
        pool_logger.debug("below the level")
        assert logs.take() == [
            "WARNING aiopg_resilient.pool: pool 'p': lost a connection to db",
            "INFO psycopg: from psycopg",
        ]
        assert logs.take() == []
    assert (top.level, top.propagate, list(top.handlers)) == before
    captured = capsys.readouterr()
    assert "lost a connection" not in captured.err + captured.out
