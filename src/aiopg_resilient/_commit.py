"""In-doubt commit resolution: what happened to a COMMIT whose answer was lost.

The protocol (see README, "Writes"):

1. Before COMMIT is sent, learn the transaction id and the server's timeline in the same
   round trip as the last statement when the layer runs it (``execute()``), or in one
   extra round trip at the end of a block (``transaction()``, ``run_transaction()``,
   ``connection()``): `XID_QUERY`. No id means the transaction wrote nothing: there is
   nothing to resolve.
2. Send COMMIT. If its answer arrives, done. If the connection dies (or the answer does
   not come within ``heartbeat_timeout``: a half-open peer), the outcome is in doubt.
3. On another connection, ask `RESOLVE_QUERY`: ``pg_xact_status(xid)``, the timeline, and
   what the old backend is doing if it still holds that xid. `decide()` turns the answer
   into committed, aborted, "terminate the old backend", "wait", or unknown.

Never infer the outcome from a lost answer: only the server's transaction status counts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["RESOLVE_QUERY", "TERMINATE_QUERY", "XID_QUERY", "Step", "Verdict", "decide"]

# The timeline of the server we talk to, or NULL on a standby. A failover moves the
# primary to a new timeline; a transaction id learnt on the old one says nothing there.
_TIMELINE = (
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) END"
)

XID_QUERY = f"SELECT pg_current_xact_id_if_assigned()::text, {_TIMELINE}"

# Status of the transaction, the timeline now, and the state of the old backend if it is
# still alive and still holds the transaction (a half-open connection).
RESOLVE_QUERY = (
    f"SELECT pg_xact_status(%(xid)s::xid8), {_TIMELINE}, "
    "(SELECT state FROM pg_stat_activity "
    "WHERE pid = %(pid)s AND backend_xid = xid(%(xid)s::xid8))"
)

TERMINATE_QUERY = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %(pid)s AND backend_xid = xid(%(xid)s::xid8)"
)


class Step(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    UNKNOWN = "unknown"
    TERMINATE = "terminate"
    WAIT = "wait"


@dataclass(frozen=True)
class Verdict:
    step: Step
    reason: str = ""


def decide(
    status: str | None,
    timeline_then: str | None,
    timeline_now: str | None,
    holder_state: str | None,
    *,
    waited: float,
    patience: float,
) -> Verdict:
    """What to do given one answer of `RESOLVE_QUERY`. Pure.

    *waited* is how long the resolution has been waiting for an in-progress transaction
    whose old backend is busy; past *patience* that backend is terminated too: its
    transaction then ends one way or the other, and the next answer says which.
    """
    if timeline_then is None or timeline_now is None:
        return Verdict(Step.UNKNOWN, "the server is a standby now: cannot tell")
    if timeline_now != timeline_then:
        return Verdict(
            Step.UNKNOWN,
            f"the server moved from timeline {timeline_then} to {timeline_now} (failover): "
            "the transaction id means nothing there",
        )
    if status == "committed":
        return Verdict(Step.COMMITTED)
    if status == "aborted":
        return Verdict(Step.ABORTED)
    if status is None:
        return Verdict(Step.UNKNOWN, "the transaction id is too old to be looked up")
    if status != "in progress":
        return Verdict(Step.UNKNOWN, f"unexpected transaction status {status!r}")
    if holder_state is None:
        # The backend is exiting (or this is a prepared transaction): ask again shortly.
        return Verdict(Step.WAIT, "the transaction is still running")
    if holder_state.startswith("idle in transaction") or waited >= patience:
        # The COMMIT never reached a backend that is still alive (half-open connection),
        # or it has been stuck for too long: end it for sure.
        return Verdict(Step.TERMINATE, f"old backend is {holder_state!r}")
    return Verdict(Step.WAIT, f"old backend is {holder_state!r}")
