"""In-doubt commit resolution, the pure part: what the server said, and what it proves.

The protocol (see README, "Writes"):

1. Before COMMIT is sent, learn `XID_QUERY` in the same round trip as the last statement
   (``execute()``) or in one extra round trip at the end of a block: the transaction's
   id, the backend's pid, and the *incarnation* of the server that issued the id (system
   identifier, timeline, postmaster start time, and a crash marker). No id means the
   transaction wrote nothing: there is nothing to resolve.
2. Send COMMIT. If its answer comes, done. If the connection dies, or the answer is late
   (``heartbeat_timeout``), ask `RESOLVE_QUERY` on another connection, and `decide()`.

Why an incarnation: transaction ids that never reached the WAL are handed out again
after crash recovery (``stop -m immediate``, a backend crash and the postmaster's
reinitialisation), and another cluster behind the same address has its own ids. So a
status is trusted only when the server that answers has the same history as the one that
issued the id:

- another system identifier, or another timeline (failover), or a standby now: unknown;
- no crash recovery since the id was issued (the crash marker, ``pg_stat_bgwriter``'s
  ``stats_reset``, is what crash recovery resets; a clean restart restores it): the status
  is the transaction's own;
- crash recovery since: a committed transaction's commit record was on disk, so after
  any number of crashes its id is never handed out again and its status stays
  "committed". Hence "aborted" or "in progress" (someone else's transaction with the
  reused id) proves ours did not commit; "committed" may be someone else's: unknown.

Never infer the outcome from a lost answer: only the server's transaction status counts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "IDENTITY_QUERY",
    "RESOLVE_QUERY",
    "TERMINATE_QUERY",
    "WRITE_XID_QUERY",
    "XID_QUERY",
    "Identity",
    "Incarnation",
    "Pending",
    "Probe",
    "Step",
    "Verdict",
    "decide",
]

# The incarnation of the server, as text columns: its system identifier, its timeline
# (NULL on a standby), its start time, and the crash marker. Epochs, not timestamps as
# text, so that a session's TimeZone or DateStyle does not change the answer.
_TIMELINE = (
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) END"
)
_SYSTEM_ID = "(SELECT system_identifier::text FROM pg_control_system())"
_STARTED = "extract(epoch FROM pg_postmaster_start_time())::text"
_CRASH_MARK = "(SELECT extract(epoch FROM stats_reset)::text FROM pg_stat_bgwriter)"
_INCARNATION = (
    f"{_SYSTEM_ID} AS system_id, {_TIMELINE} AS timeline, {_STARTED} AS started, "
    f"{_CRASH_MARK} AS crash_mark"
)

# What cannot change during a connection's life (a restart or a crash recovery ends every
# connection): learnt once, when the connection is made. The timeline can change (a
# standby promoted under its connections): it is learnt with every id.
IDENTITY_QUERY = f"SELECT {_SYSTEM_ID}, {_STARTED}, {_CRASH_MARK}"
Identity = tuple[str | None, str | None, str | None]
"""A row of `IDENTITY_QUERY`: system identifier, start time, crash marker."""

XID_QUERY = (
    "SELECT pg_current_xact_id_if_assigned()::text AS xid, pg_backend_pid() AS pid, "
    f"{_TIMELINE} AS timeline, extract(epoch FROM clock_timestamp())::text AS issued_at"
)
# For execute(): the statement is a write, so the transaction always gets an id, even
# when nothing but COMMIT would assign one (NOTIFY, pg_notify()).
WRITE_XID_QUERY = XID_QUERY.replace("pg_current_xact_id_if_assigned()", "pg_current_xact_id()")

# The status of the transaction, the incarnation now, and the state of the old backend
# (if it still exists, and whether it still holds the transaction). An id at or past the
# snapshot's xmax has not completed: pg_xact_status() would raise for an id that crash
# recovery took back ("in the future"), so it is reported as in progress.
RESOLVE_QUERY = (
    "SELECT CASE WHEN %(xid)s::xid8 < pg_snapshot_xmax(pg_current_snapshot()) "
    "THEN pg_xact_status(%(xid)s::xid8) ELSE 'in progress' END, "
    f"{_INCARNATION}, "
    "(SELECT state FROM pg_stat_activity WHERE pid = %(pid)s), "
    "(SELECT backend_xid = xid(%(xid)s::xid8) FROM pg_stat_activity WHERE pid = %(pid)s), "
    "c.next_xid, extract(epoch FROM c.checkpoint_time)::text "
    "FROM pg_control_checkpoint() c"
)

# Only a backend that still holds the transaction and is idle in it: its COMMIT never
# arrived. A backend busy with the COMMIT is never terminated.
TERMINATE_QUERY = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %(pid)s AND backend_xid = xid(%(xid)s::xid8) "
    "AND state LIKE 'idle in transaction%%'"
)


@dataclass(frozen=True)
class Incarnation:
    """Which server, in which life, answered a query."""

    system_id: str | None
    timeline: str | None
    """None on a standby."""
    started: str | None
    crash_mark: str | None
    """Moves when the server goes through crash recovery (ids may be reused after)."""

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> Incarnation:
        system_id, timeline, started, crash_mark = (None if v is None else str(v) for v in row)
        return cls(system_id, timeline, started, crash_mark)


@dataclass(frozen=True)
class Pending:
    """What the layer knows of a transaction before it sends COMMIT."""

    xid: int
    pid: int
    incarnation: Incarnation
    issued_at: float | None = None
    """The server's clock when the id was learnt (epoch seconds)."""

    @classmethod
    def from_row(cls, row: tuple[object, ...] | None) -> Pending | None:
        """From a row of `XID_QUERY`; None if the transaction has no id (wrote nothing)."""
        if row is None or row[0] is None:
            return None
        issued = None if row[6] is None else float(str(row[6]))
        incarnation = Incarnation.from_row(tuple(row[2:6]))
        return cls(int(str(row[0])), int(str(row[1])), incarnation, issued)

    @classmethod
    def learnt(cls, row: tuple[object, ...] | None, identity: Identity | None) -> Pending | None:
        """From a row of `XID_QUERY` and the connection's `Identity` (None when it could
        not be learnt: then nothing can be tied to it, and an outcome in doubt is
        unknown)."""
        if row is None or row[0] is None:
            return None
        xid, pid, timeline, issued = row
        system_id, started, crash_mark = identity or (None, None, None)
        return cls.from_row((xid, pid, system_id, timeline, started, crash_mark, issued))


@dataclass(frozen=True)
class Probe:
    """One answer of `RESOLVE_QUERY`."""

    status: str | None
    incarnation: Incarnation
    holder_state: str | None
    """State of the old backend if a backend with its pid exists, else None."""
    holder_has_xid: bool | None
    checkpoint_next_xid: int | None = None
    """``next_xid`` of the server's latest checkpoint, as a full 64-bit id."""
    checkpoint_time: float | None = None

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> Probe:
        status = None if row[0] is None else str(row[0])
        holder = None if row[5] is None else str(row[5])
        has_xid = None if row[6] is None else bool(row[6])
        next_xid = None if row[7] is None else _full_xid(str(row[7]))
        at = None if row[8] is None else float(str(row[8]))
        return cls(status, Incarnation.from_row(tuple(row[1:5])), holder, has_xid, next_xid, at)


def _full_xid(text: str) -> int:
    """``'epoch:xid'`` (pg_control_checkpoint's next_xid) as a 64-bit id."""
    epoch, _, xid = text.partition(":")
    return (int(epoch) << 32) | int(xid) if xid else int(epoch)


class Step(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    UNKNOWN = "unknown"
    TERMINATE = "terminate"
    """The old backend is idle in the transaction: its COMMIT never arrived."""
    WAIT = "wait"
    """The transaction is still running (a COMMIT being worked on): ask again."""


@dataclass(frozen=True)
class Verdict:
    step: Step
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.step in (Step.COMMITTED, Step.ABORTED, Step.UNKNOWN)


def decide(pending: Pending, probe: Probe) -> Verdict:
    """What one answer of `RESOLVE_QUERY` proves about *pending*'s COMMIT. Pure."""
    then, now = pending.incarnation, probe.incarnation
    status = probe.status
    if now.timeline is None:
        return Verdict(Step.UNKNOWN, "the server is a standby now: cannot tell")
    if then.system_id is None or now.system_id != then.system_id:
        return Verdict(
            Step.UNKNOWN,
            f"another cluster answers now (system identifier {now.system_id}, was "
            f"{then.system_id}): transaction {pending.xid} means nothing there",
        )
    if now.timeline != then.timeline:
        return Verdict(
            Step.UNKNOWN,
            f"the server moved from timeline {then.timeline} to {now.timeline} (failover): "
            "the transaction id means nothing there",
        )
    if status is None:
        return Verdict(Step.UNKNOWN, "the transaction id is too old to be looked up")
    alive = status == "in progress" and probe.holder_has_xid is True and now.started == then.started
    if (then.crash_mark is None or now.crash_mark != then.crash_mark) and not alive:
        # Crash recovery since the id was issued: ids that were not on disk are reused.
        # (Unless the old backend still holds the id: then no crash happened, only a
        # reset of the statistics the crash marker comes from.)
        if status == "committed" and _past_recovered_wal(pending, probe):
            return Verdict(
                Step.ABORTED,
                "the id is past every id of the WAL that crash recovery kept (the latest "
                "checkpoint's next_xid, written after the id was learnt): ours never reached "
                "the disk, 'committed' is another transaction's",
            )
        if status == "committed":
            return Verdict(
                Step.UNKNOWN,
                "the server went through crash recovery since the transaction began; "
                "its id may have been handed out again, so 'committed' may be another "
                "transaction's",
            )
        if status in ("aborted", "in progress"):
            return Verdict(
                Step.ABORTED,
                "not committed before the crash (a committed transaction's id is never reused)",
            )
        return Verdict(Step.UNKNOWN, f"unexpected transaction status {status!r}")
    if status == "committed":
        return Verdict(Step.COMMITTED)
    if status == "aborted":
        return Verdict(Step.ABORTED)
    if status != "in progress":
        return Verdict(Step.UNKNOWN, f"unexpected transaction status {status!r}")
    if now.started != then.started or probe.holder_state is None:
        # The backend is exiting (or this is a prepared transaction): ask again shortly.
        return Verdict(Step.WAIT, "the transaction is still running")
    if probe.holder_has_xid and probe.holder_state.startswith("idle in transaction"):
        return Verdict(Step.TERMINATE, f"old backend is {probe.holder_state!r}")
    return Verdict(Step.WAIT, f"old backend is {probe.holder_state!r}: still committing")


def _past_recovered_wal(pending: Pending, probe: Probe) -> bool:
    """Whether the id is at or past the latest checkpoint's ``next_xid``, that checkpoint
    being written after the id was learnt.

    Sound after any number of crashes: a committed transaction's commit record is on
    disk, every recovery after it replays it, so every checkpoint written after that
    (including the end-of-recovery one) has ``next_xid`` above the id. Without a crash,
    a checkpoint written after the id was handed out also has ``next_xid`` above it, so
    the test never fires then.

    "Written after the id was learnt" holds when another postmaster answers than the one
    that issued the id (this is only asked after crash recovery, whose end-of-recovery
    checkpoint is written before the server accepts connections, so after the issuing
    postmaster ended; a failover is ruled out earlier by the timeline), or by the server's
    clock: checkpoint times are whole seconds, hence the strict comparison, which alone
    missed a restart within the second the id was learnt in.
    """
    next_xid = probe.checkpoint_next_xid
    if next_xid is None or pending.xid < next_xid:
        return False
    then, now = pending.incarnation.started, probe.incarnation.started
    if then is not None and now is not None and now != then:
        return True
    issued, at = pending.issued_at, probe.checkpoint_time
    return issued is not None and at is not None and at > issued
