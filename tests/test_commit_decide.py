"""decide(): the in-doubt commit decision table, pure logic, no server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from aiopg_resilient._commit import Incarnation, Pending, Probe, Step, decide

THEN = Incarnation(system_id="7713", timeline="00000001", started="100.5", crash_mark="99.1")
PENDING = Pending(xid=726, pid=4242, incarnation=THEN)


def _step(
    status: str | None,
    *,
    now: Incarnation = THEN,
    holder: str | None = None,
    has_xid: bool | None = True,
    then: Incarnation = THEN,
) -> Step:
    pending = replace(PENDING, incarnation=then)
    return decide(pending, Probe(status, now, holder, has_xid)).step


def test_committed_and_aborted_are_final() -> None:
    """Guarantee 2: same incarnation, the server's answer is the outcome."""
    assert _step("committed") is Step.COMMITTED
    assert _step("aborted") is Step.ABORTED


def test_another_timeline_is_unknown() -> None:
    """Guarantee 12: after a failover the xid means nothing on the new timeline."""
    now = replace(THEN, timeline="00000002")
    assert _step("committed", now=now) is Step.UNKNOWN
    assert _step("aborted", now=now) is Step.UNKNOWN


def test_standby_is_unknown() -> None:
    """Guarantee 12: reconnected to a standby (no timeline of its own): cannot tell."""
    assert _step("committed", now=replace(THEN, timeline=None)) is Step.UNKNOWN


def test_another_cluster_is_unknown() -> None:
    """Guarantee 12: another cluster behind the same address (same timeline number 1):
    its statuses say nothing about our ids, whatever they say."""
    other = replace(THEN, system_id="9999")
    for status in ("committed", "aborted", "in progress"):
        assert _step(status, now=other, holder="idle in transaction") is Step.UNKNOWN
    assert _step("committed", then=replace(THEN, system_id=None)) is Step.UNKNOWN


def test_after_crash_recovery_committed_is_unknown() -> None:
    """Guarantee 12: after crash recovery ids are handed out again: 'committed' may be
    another transaction's, so it is never taken as ours."""
    crashed = replace(THEN, started="200.0", crash_mark="199.9")
    assert _step("committed", now=crashed) is Step.UNKNOWN
    # A backend crash reinitialises the server without a new postmaster start time.
    reinit = replace(THEN, crash_mark="150.0")
    assert _step("committed", now=reinit) is Step.UNKNOWN
    # No crash marker to compare: assume the worst.
    assert _step("committed", then=replace(THEN, crash_mark=None)) is Step.UNKNOWN


def test_after_crash_recovery_not_committed_is_aborted() -> None:
    """Guarantee 2: a committed id is never reused (its commit record was on disk), so
    after crash recovery 'aborted' or 'in progress' (a reused id, running) proves ours
    did not commit: safe to re-run."""
    crashed = replace(THEN, started="200.0", crash_mark="199.9")
    assert _step("aborted", now=crashed) is Step.ABORTED
    assert _step("in progress", now=crashed, holder="active") is Step.ABORTED
    assert _step(None, now=crashed) is Step.UNKNOWN  # too old: cannot tell


def test_stats_reset_with_the_backend_alive_is_no_crash() -> None:
    """A reset of the statistics moves the crash marker without a crash: while the old
    backend still holds the id, it is busy committing, never 'aborted'."""
    reset = replace(THEN, crash_mark="500.0")
    assert _step("in progress", now=reset, holder="active") is Step.WAIT
    assert _step("in progress", now=reset, holder="idle in transaction") is Step.TERMINATE
    assert _step("committed", now=reset, holder=None, has_xid=None) is Step.UNKNOWN


def test_clean_restart_keeps_statuses() -> None:
    """A clean restart (restart -m fast) writes the next id to disk: no id is reused, the
    status is the transaction's own."""
    restarted = replace(THEN, started="300.0")
    assert _step("committed", now=restarted) is Step.COMMITTED
    assert _step("aborted", now=restarted) is Step.ABORTED
    # The pid may belong to another backend now: never terminate on its word.
    assert _step("in progress", now=restarted, holder="idle in transaction") is Step.WAIT


def test_id_too_old_is_unknown() -> None:
    """pg_xact_status() returns NULL for an xid past the clog horizon."""
    assert _step(None) is Step.UNKNOWN
    assert _step("weird") is Step.UNKNOWN


@pytest.mark.parametrize("state", ["idle in transaction", "idle in transaction (aborted)"])
def test_idle_holder_is_terminated(state: str) -> None:
    """The COMMIT never reached a backend still alive and holding the xid: terminate it."""
    assert _step("in progress", holder=state) is Step.TERMINATE
    assert _step("in progress", holder=state, has_xid=False) is Step.WAIT


def test_busy_holder_is_never_terminated() -> None:
    """Guarantee 13: a backend busy committing (a synchronous-replication wait, deferred
    triggers) is waited for, however long: never cancelled nor terminated."""
    assert _step("in progress", holder="active") is Step.WAIT


def test_in_progress_without_holder_waits() -> None:
    """An exiting backend still shows the xid in progress for a moment: ask again."""
    assert _step("in progress", holder=None) is Step.WAIT


def test_rows_are_parsed() -> None:
    """The rows of XID_QUERY and RESOLVE_QUERY map onto Pending and Probe."""
    assert Pending.from_row((None, 1, "s", "t", "u", "c", "1.0")) is None
    pending = Pending.from_row(("726", 4242, "7713", "00000001", "100.5", "99.1", "120.25"))
    assert pending == replace(PENDING, issued_at=120.25)
    row = ("committed", "7713", "00000001", "100.5", "99.1", "idle", None, "1:5", "130")
    probe = Probe.from_row(row)
    assert probe == Probe("committed", THEN, "idle", None, (1 << 32) | 5, 130.0)


def _after_crash(
    status: str, *, next_xid: int, checkpoint_at: float, restarted: bool = True
) -> Step:
    # restarted: another postmaster (stop -m immediate, then start); else the same one
    # reinitialised after a backend crashed (same start time, crash recovery all the same).
    crashed = replace(THEN, started="200.0" if restarted else THEN.started, crash_mark="199.9")
    pending = replace(PENDING, issued_at=120.25)
    probe = Probe(status, crashed, None, None, next_xid, checkpoint_at)
    return decide(pending, probe).step


def test_id_past_the_recovered_wal_is_aborted() -> None:
    """Guarantee 12: after crash recovery, an id at or past the next_xid of a checkpoint
    written after the id was learnt never reached the disk: 'committed' is a reuse, and
    ours is proven not applied."""
    assert _after_crash("committed", next_xid=726, checkpoint_at=121.0) is Step.ABORTED
    assert _after_crash("committed", next_xid=700, checkpoint_at=121.0) is Step.ABORTED
    assert _after_crash("committed", next_xid=726, checkpoint_at=121.0, restarted=False) is (
        Step.ABORTED
    )


def test_a_restart_within_the_second_the_id_was_learnt_is_still_proof() -> None:
    """Another postmaster answers: its end-of-recovery checkpoint was written after the
    issuing one ended, whatever the clock says (checkpoint times are whole seconds, and a
    crash and restart take a tenth of one: the demo met it once in ten runs)."""
    assert _after_crash("committed", next_xid=726, checkpoint_at=120.0) is Step.ABORTED
    assert _after_crash("committed", next_xid=700, checkpoint_at=100.0) is Step.ABORTED
    assert _after_crash("committed", next_xid=727, checkpoint_at=120.0) is Step.UNKNOWN


def test_id_before_the_recovered_wal_stays_unknown() -> None:
    """Below the recovered next_xid the id was on disk: ours or a reuse in between, so
    unknown; and in the same postmaster, a checkpoint not provably later than the id
    proves nothing."""
    assert _after_crash("committed", next_xid=727, checkpoint_at=121.0) is Step.UNKNOWN
    # Checkpoint times are whole seconds: 120 may be before 120.25.
    for at in (120.0, 100.0):
        assert _after_crash("committed", next_xid=700, checkpoint_at=at, restarted=False) is (
            Step.UNKNOWN
        )
