"""The workload: `Plan.workers` tasks doing reads and writes until told to stop.

Worker ``w`` draws its operations from ``random.Random(w)``, so every contender gets the
same sequence of reads and writes. Write ids are unique in a run (``w * 10**7 + i``). Each
operation is bounded by a deadline; whatever it raises is what the application saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

from ... import CommitUnknown
from ._contenders import Client
from ._plan import Plan
from ._tally import Op, OpKind, Outcome

__all__ = ["OP_DEADLINE", "Live", "describe", "run_workers"]

OP_DEADLINE = 20.0
"""Seconds an operation may take before the worker gives up on it (an error)."""

_ID_STRIDE = 10**7


def describe(exc: BaseException) -> str:
    """An error as the application would log it: class, and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class Live:
    """Counts for the progress line, updated as operations end."""

    ops: int = 0
    errors: int = 0
    recorded: list[Op] = field(default_factory=list)

    def add(self, op: Op) -> None:
        self.recorded.append(op)
        self.ops += 1
        if op.outcome != "ok":
            self.errors += 1


async def _operation(client: Client, kind: OpKind, op_id: int) -> tuple[Outcome, str | None]:
    try:
        with anyio.fail_after(OP_DEADLINE):
            if kind == "write":
                await client.write(op_id)
            else:
                got = await client.read(op_id)
                if got != op_id:
                    return "failed", f"wrong answer: {got!r} for {op_id}"
    except CommitUnknown as exc:
        return "unknown", describe(exc)
    except Exception as exc:  # whatever the application would have seen
        return "failed", describe(exc)
    return "ok", None


async def _worker(
    w: int,
    client: Client,
    plan: Plan,
    clock: Callable[[], float],
    stop: anyio.Event,
    live: Live,
    max_ops: int,
) -> None:
    rng = random.Random(w)
    for i in range(max_ops):
        if stop.is_set():
            return
        kind: OpKind = "write" if rng.random() < plan.write_share else "read"
        op_id = w * _ID_STRIDE + i
        began = clock()
        outcome, error = await _operation(client, kind, op_id)
        live.add(Op(kind, op_id, began, clock(), outcome, error))
        await anyio.sleep(plan.pause)


async def run_workers(
    clients: Sequence[Client],
    plan: Plan,
    clock: Callable[[], float],
    stop: anyio.Event,
    live: Live,
) -> None:
    """Run one worker per client until `stop` is set (each finishes its operation in
    progress), recording every operation in `live`."""
    # A bound on the loop, far above what a run reaches (an operation takes >= plan.pause).
    max_ops = min(_ID_STRIDE, int(10 * plan.run_seconds / plan.pause) + 10_000)
    async with anyio.create_task_group() as tg:
        for w, client in enumerate(clients):
            tg.start_soon(_worker, w, client, plan, clock, stop, live, max_ops)
