"""What a benchmark report says about where it ran: library versions, the machine, the
server, and how busy the machine was with other work while the benchmark ran."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool

import aiopg_resilient
from aiopg_resilient.testing import PostgresServer


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "aiopg_resilient": aiopg_resilient.__version__,
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": str(psycopg.pq.version()),
        "psycopg_pool": psycopg_pool.__version__,
        "asyncpg": asyncpg.__version__,
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
    }
    for dist in ("sqlalchemy", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _first(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> dict[str, Any]:
    """CPU model and count, memory, kernel (Linux /proc; less elsewhere)."""
    mem = _first("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cpus": os.cpu_count(),
        "memory_gib": None if mem is None else round(int(mem.split()[0]) / 2**20, 1),
        "kernel": platform.release(),
        "system": platform.system(),
    }


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def code_version(root: Path) -> str | None:
    """The checkout's commit, and whether files differ from it (read-only git calls)."""
    try:
        head = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


async def server_info(pg: PostgresServer) -> dict[str, Any]:
    rows = await pg.execute(
        "SELECT current_setting('server_version'), current_setting('ssl'), "
        "current_setting('fsync'), current_setting('synchronous_commit')"
    )
    version, ssl, fsync, sync_commit = rows[0]
    return {
        "server_version": version,
        "server_ssl": ssl,
        "fsync": fsync,
        "synchronous_commit": sync_commit,
        "backend": pg.backend,
    }
