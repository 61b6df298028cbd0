"""Connection defaults and labels: pure logic, no server."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from aiopg_resilient._conninfo import CONNECTION_DEFAULTS, apply_defaults, describe


def test_defaults_are_added() -> None:
    """Keepalives, tcp_user_timeout, connect_timeout and application_name are set."""
    params = conninfo_to_dict(apply_defaults("host=db", None, application_name="app"))
    for key, value in CONNECTION_DEFAULTS.items():
        assert params[key] == value
    assert params["application_name"] == "app"


def test_user_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value in the DSN, the connect kwargs or the PG* environment is never overridden."""
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "9")
    dsn = "postgresql://u:secret@db/app?keepalives_idle=99&application_name=mine"
    params = conninfo_to_dict(apply_defaults(dsn, {"tcp_user_timeout": 1}, application_name="pool"))
    assert params["keepalives_idle"] == "99"
    assert params["application_name"] == "mine"
    assert "tcp_user_timeout" not in params  # psycopg passes the kwarg itself
    assert "connect_timeout" not in params  # libpq reads PGCONNECT_TIMEOUT
    assert params["password"] == "secret"


def test_malformed_dsn_says_what_to_fix() -> None:
    """A malformed DSN raises at once with the expected syntax in the message."""
    with pytest.raises(psycopg.ProgrammingError, match="postgresql://"):
        apply_defaults("host='open", None, application_name="x")


def test_describe_has_no_secret() -> None:
    """The label used in logs and reprs never carries the password."""
    label = describe("postgresql://app:s3cret@db.internal:6432/shop")
    assert label == "app@db.internal:6432/shop"
    assert "s3cret" not in label
