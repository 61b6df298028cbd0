"""How much of the machine other processes and the hypervisor took during a measurement
of bench_reads.py (Linux /proc accounting)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from aiopg_resilient.testing import PostgresServer


@dataclass
class Load:
    """What else the machine did during a measurement (Linux /proc; zeros elsewhere)."""

    steal: float = 0.0
    """Share of the machine's CPU time the hypervisor gave to other guests."""
    foreign: float = 0.0
    """Share of the machine's CPU time used by processes other than this one and the
    PostgreSQL server (e.g. a test suite running next to the benchmark)."""


def _proc_times(pid: int | str) -> tuple[int, int, int] | None:
    """(ppid, own utime + stime, reaped children's cutime + cstime), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


class CpuMeter:
    """Splits the machine's CPU time over a window into ours (this process and the
    PostgreSQL server with its backends), the hypervisor's steal, and everyone else's.

    Ours is the CPU time of this process, of the postmaster and of its live children,
    counting reaped children too (a child's time passes to its parent's cutime/cstime
    when it is reaped; the postmaster is our child): the sum is conserved across
    backends exiting and across server restarts, so its difference is exact.
    """

    def __init__(self, pg: PostgresServer) -> None:
        self._pg = pg
        self._start: tuple[list[int], int] | None = None

    @staticmethod
    def _machine() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None

    def _postmaster(self) -> int | None:
        with contextlib.suppress(Exception):
            data_dir = self._pg.data_dir
            if data_dir is not None:
                return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
        return None

    def _ours(self) -> int | None:
        me = _proc_times(os.getpid())
        if me is None:
            return None
        total = me[1] + me[2]
        postmaster = self._postmaster()
        if postmaster is None:
            return total
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                info = _proc_times(entry.name)
                if info is None:
                    continue
                if int(entry.name) == postmaster and info[0] == os.getpid():
                    total += info[1] + info[2]
                elif info[0] == postmaster:
                    total += info[1]
        return total

    def start(self) -> None:
        machine, ours = self._machine(), self._ours()
        self._start = None if machine is None or ours is None else (machine, ours)

    def stop(self) -> Load | None:
        machine, ours = self._machine(), self._ours()
        if self._start is None or machine is None or ours is None:
            return None
        m0, ours0 = self._start
        d = [b - a for a, b in zip(m0, machine, strict=True)]
        total = sum(d)
        if total <= 0:
            return None
        busy = d[0] + d[1] + d[2]  # user + nice + system (irq/softirq time is nobody's)
        return Load(steal=d[7] / total, foreign=max(0, busy - (ours - ours0)) / total)
