"""``aiopg-resilient doctor --probe-idle``: the idle timeout of the path, measured for real
(a proxy that cuts idle sessions, the server's own idle_session_timeout, nothing)."""

from __future__ import annotations

import time

import pytest

from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .test_doctor import doctor_json, finding, role_with

_CUT = 3.0


def test_probe_idle_measures_a_proxy_idle_cut_within_20_percent(
    chaos_proxy: ChaosProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    """A proxy cutting sessions idle 3 s: the bracket holds 3 s, its middle is within 20 %,
    TCP keepalives are found not to help (the proxy ends TCP), a heartbeat below it is
    recommended; the probe stops soon after the cut."""
    chaos_proxy.idle_cut(_CUT)
    assert chaos_proxy.dsn is not None
    start = time.monotonic()
    code, document = doctor_json(capsys, chaos_proxy.dsn, "--probe-idle", "6")
    elapsed = time.monotonic() - start
    assert code == 0  # a warning
    idle = document["idle_probe"]
    assert idle["error"] is None
    assert idle["last_alive"] < idle["first_dead"]
    assert idle["first_dead"] >= _CUT - 0.1
    assert abs(idle["timeout"] - _CUT) <= 0.2 * _CUT, idle
    assert idle["keepalive_alive"] is False
    assert len(idle["checks"]) <= 40
    found = finding(document, "idle.cut")
    assert found["severity"] == "warning"
    assert "something in the path cuts connections idle" in found["title"]
    assert 0 < found["pool"]["heartbeat_interval"] <= _CUT / 2
    assert document["recommendations"]["pool"] == found["pool"]
    assert elapsed < 15


def test_probe_idle_names_the_servers_idle_session_timeout(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """idle_session_timeout = 2s for a role: the probe measures ~2 s and names the server."""
    with role_with(pg, idle_session_timeout="2s") as dsn:
        code, document = doctor_json(capsys, dsn, "--probe-idle", "4")
    assert code == 0
    idle = document["idle_probe"]
    assert abs(idle["timeout"] - 2.0) <= 0.4, idle
    found = finding(document, "idle.cut")
    assert found["title"].startswith("the server's idle_session_timeout cuts")


def test_probe_idle_without_a_cut(pg: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing cuts: every connection is alive after up to the asked-for time: ok."""
    code, document = doctor_json(capsys, pg.dsn, "--probe-idle", "1.5")
    assert code == 0
    idle = document["idle_probe"]
    assert idle["first_dead"] is None
    assert all(check["alive"] for check in idle["checks"])
    assert max(check["idle"] for check in idle["checks"]) >= 1.5
    assert finding(document, "idle.cut")["severity"] == "ok"
