"""decide(): the in-doubt commit decision table, pure logic, no server."""

from __future__ import annotations

import pytest

from aiopg_resilient._commit import Step, decide

TL = "00000001"


def _step(
    status: str | None,
    *,
    then: str | None = TL,
    now: str | None = TL,
    holder: str | None = None,
    waited: float = 0.0,
) -> Step:
    return decide(status, then, now, holder, waited=waited, patience=5.0).step


def test_committed_and_aborted_are_final() -> None:
    """The server's answer is the outcome: committed or aborted."""
    assert _step("committed") is Step.COMMITTED
    assert _step("aborted") is Step.ABORTED


def test_another_timeline_is_unknown() -> None:
    """After a failover the xid means nothing on the new timeline: never guess."""
    assert _step("committed", then=TL, now="00000002") is Step.UNKNOWN
    assert _step("aborted", then=TL, now="00000002") is Step.UNKNOWN


def test_standby_is_unknown() -> None:
    """Reconnected to a standby (no timeline of its own): cannot tell."""
    assert _step("committed", now=None) is Step.UNKNOWN


def test_id_too_old_is_unknown() -> None:
    """pg_xact_status() returns NULL for an xid past the clog horizon."""
    assert _step(None) is Step.UNKNOWN
    assert _step("weird") is Step.UNKNOWN


@pytest.mark.parametrize("state", ["idle in transaction", "idle in transaction (aborted)"])
def test_half_open_holder_is_terminated(state: str) -> None:
    """The COMMIT never reached a backend still alive and holding the xid: terminate it."""
    assert _step("in progress", holder=state) is Step.TERMINATE


def test_busy_holder_is_waited_for_then_terminated() -> None:
    """A backend busy committing (e.g. sync replication) is waited for, up to patience."""
    assert _step("in progress", holder="active", waited=1.0) is Step.WAIT
    assert _step("in progress", holder="active", waited=5.0) is Step.TERMINATE


def test_in_progress_without_holder_waits() -> None:
    """An exiting backend still shows the xid in progress for a moment: ask again."""
    assert _step("in progress", holder=None) is Step.WAIT
