"""The doctor's pure logic, continued: the idle-probe plan and bracket, the report, its
rendering and the command line, without a server."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from aiopg_resilient.cli import main
from aiopg_resilient.cli.doctor._idle_logic import (
    MOST,
    RATIO,
    assess_idle,
    bracket,
    plan,
    should_stop,
)
from aiopg_resilient.cli.doctor._model import (
    Finding,
    HostReport,
    IdleCheck,
    IdleResult,
    Severity,
)
from aiopg_resilient.cli.doctor._render import to_json, to_text
from aiopg_resilient.cli.doctor._report import assess, recommend

from .test_doctor_logic import NOW, SECRET, TARGET, dsn, facts, host

# --- the idle probe -----------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [1.0, 6.0, 60.0, 350.0, 3600.0])
def test_idle_plan_is_a_bounded_geometric_ladder(seconds: float) -> None:
    """At most 40 rungs, ratio at most 1.15, the last one the asked-for duration."""
    rungs = plan(seconds)
    assert 2 <= len(rungs) <= MOST
    assert math.isclose(rungs[-1], seconds)
    assert all(b / a <= RATIO + 1e-9 for a, b in itertools.pairwise(rungs))


@pytest.mark.parametrize("cut", [0.7, 1.3, 2.0, 3.0, 4.4, 7.7, 29.0, 350.0])
def test_idle_bracket_measures_within_8_percent(cut: float) -> None:
    """Simulated: connection i is alive iff its idle time is under the cut; the middle of
    the bracket is within 7.5 % (plus the lateness of the tests) of the real timeout."""
    checks: list[IdleCheck] = []
    for planned in plan(max(cut * 2, 6.0)):
        idle = planned * 1.01  # tested a little late, as on a loaded machine
        checks.append(IdleCheck(planned, idle, idle < cut, None if idle < cut else "cut"))
        if should_stop(checks):
            break
    low, high = bracket(checks)
    assert high is not None
    assert (low or 0.0) < cut <= high
    middle = ((low or 0.0) + high) / 2
    assert abs(middle - cut) / cut <= 0.08


def test_idle_bracket_ignores_an_early_stray_death() -> None:
    """A lone dead connection before live ones is not the bracket."""
    checks = [
        IdleCheck(1, 1.0, True),
        IdleCheck(1.2, 1.2, False, "reset"),
        IdleCheck(1.4, 1.4, True),
        IdleCheck(1.6, 1.6, False),
        IdleCheck(1.8, 1.8, False),
    ]
    assert bracket(checks) == (1.4, 1.6)
    assert should_stop(checks)
    assert not should_stop(checks[:4])


def test_idle_verdict_recommends_what_keeps_connections() -> None:
    """Keepalives that survive: keepalives_idle and a heartbeat; that do not: heartbeat."""
    checks = (IdleCheck(2.9, 2.9, True), IdleCheck(3.3, 3.3, False, "SSL error"))
    through_nat = IdleResult("h:1", 6, checks, 2.9, 3.3, keepalive_alive=True, keepalive_idle=3.5)
    (found,) = assess_idle(through_nat, keepalives_idle=10, heartbeat=15.0)
    assert found.severity is Severity.WARNING
    assert "~3.1 s" in found.title
    assert found.conninfo == {"keepalives_idle": 1}
    assert found.pool == {"heartbeat_interval": 1.4}
    through_proxy = IdleResult("h:1", 6, checks, 2.9, 3.3, keepalive_alive=False)
    (found,) = assess_idle(through_proxy, keepalives_idle=10, heartbeat=15.0)
    assert found.conninfo == {}
    assert "do not reach" in found.evidence
    quiet = IdleResult("h:1", 6, (IdleCheck(6, 6.0, True),), 6.0, None)
    assert assess_idle(quiet, 10, 15.0)[0].severity is Severity.OK


# --- the report ---------------------------------------------------------------------------


def test_recommendations_merge_to_the_stricter_value() -> None:
    """Two limits on the same setting give the smaller; ok and info recommend nothing."""
    findings = [
        Finding("a", Severity.WARNING, "", pool={"heartbeat_interval": 5.0}),
        Finding("b", Severity.PROBLEM, "", pool={"heartbeat_interval": 2.0}),
        Finding("c", Severity.INFO, "", conninfo={"sslmode": "verify-full"}),
    ]
    assert recommend(findings) == ({}, {"heartbeat_interval": 2.0})


def test_exit_status() -> None:
    """3 with no login, 1 with a problem, 0 with warnings unless strict."""
    unreachable = assess(dsn(), [HostReport(TARGET, tcp_error="refused")], None, NOW)
    assert unreachable.exit_status() == 3
    assert unreachable.exit_status(strict=True) == 3
    warned = assess(dsn("host=db.example keepalives=0"), [host()], None, NOW)
    assert warned.worst is Severity.WARNING
    assert (warned.exit_status(), warned.exit_status(strict=True)) == (0, 1)
    full = assess(dsn(), [host(facts=facts(others=99))], None, NOW)
    assert full.exit_status() == 1


def test_text_is_short_when_healthy_and_never_shows_the_password() -> None:
    """A healthy report is three lines; verbose and JSON show more, never the secret."""
    healthy = assess(dsn(), [host()], None, NOW)
    text = to_text(healthy)
    assert len(text.splitlines()) == 3, text
    assert "no problem found" in text
    assert "db.example:5432: PostgreSQL 15.18, primary, TLS, certificate and host name" in text
    verbose = to_text(healthy, verbose=True)
    assert "password=***" in verbose
    document = json.loads(to_json(healthy))
    assert document["status"] == "ok"
    assert document["exit_status"] == 0
    assert document["dsn"].count("***") == 1
    for output in (text, verbose, to_json(healthy)):
        assert SECRET not in output


def test_secrets_leaking_into_messages_are_scrubbed() -> None:
    """Should a server message ever quote the password, the output masks it."""
    leaky = HostReport(TARGET, tcp_ms=1.0, login_error=f'role "{SECRET}" does not exist')
    report = assess(dsn(), [leaky], None, NOW)
    assert SECRET not in to_text(report, verbose=True)
    assert SECRET not in to_json(report)


# --- the command line ---------------------------------------------------------------------


def test_bad_dsn_exits_2_with_what_to_fix(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed DSN: exit status 2, the fix on stderr, nothing on stdout."""
    assert main(["doctor", "host=db sslmode=sometimes"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "bad DSN" in err
    assert "verify-full" in err


def test_help_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the options; a --probe-idle out of range is a usage error."""
    with pytest.raises(SystemExit) as info:
        main(["doctor", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--probe-idle", "--json", "--timeout", "--strict", "--verbose", "Exit status"):
        assert option in out
    with pytest.raises(SystemExit) as info:
        main(["doctor", "host=x", "--probe-idle", "0"])
    assert info.value.code == 2
    assert "--probe-idle" in capsys.readouterr().err
