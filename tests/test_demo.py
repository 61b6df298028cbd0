"""`aiopg-resilient demo` for real: the console script in a subprocess (no terminal), its own
throwaway server, real faults. The table must show the usual advice doubling or losing
writes and plain psycopg failing, where the pool does neither; the library's log lines must
never land in the output; with no server to start, the command says what to install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aiopg_resilient.cli.demo._table import ROWS

SCRIPT = Path(sys.executable).parent / "aiopg-resilient"
LABELS = ("plain psycopg", "usual advice", "ResilientPool")
# Lines the library logs during a run (pool, in-doubt resolution, test server, proxy).
LIBRARY_LOG = re.compile(
    r"lost a connection|unreachable|in doubt \(|resolved: |chaos proxy|PostgreSQL on port"
    r"|aiopg_resilient\.|psycopg\.pool|^WARNING|^INFO"
)


def _demo(*args: str, timeout: float = 110.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOPG_RESILIENT_TEST")}
    return subprocess.run(
        [str(SCRIPT), "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _table(text: str) -> dict[str, list[int]]:
    """The final table: row label -> the first number of each contender's cell."""
    lines = text.splitlines()
    top = next(
        i
        for i, line in enumerate(lines)
        if line.split() and " ".join(line.split()) == " ".join(LABELS)
    )
    block = lines[top + 1 : top + 1 + len(ROWS)]
    assert [line[:32].rstrip() for line in block] == [label for label, _ in ROWS], text
    table: dict[str, list[int]] = {}
    for line in block:
        cells = [c for c in re.split(r"\s{2,}", line[32:].strip()) if c]
        assert len(cells) == 3, line
        table[line[:32].strip()] = [
            int(m.group().replace(",", "")) if (m := re.match(r"[\d,]+", c)) else -1 for c in cells
        ]
    return table


def _assert_the_pool_alone_keeps_its_promise(table: dict[str, list[int]]) -> None:
    plain, advice, pool = ({row: cells[i] for row, cells in table.items()} for i in range(3))
    assert pool["operations"] > 0
    assert pool["errors the application saw"] == 0
    assert pool["doubled writes"] == 0
    assert pool["lost writes (reported OK)"] == 0
    assert pool["writes reported failed, applied"] == 0
    harm = (
        advice["doubled writes"]
        + advice["lost writes (reported OK)"]
        + advice["writes reported failed, applied"]
    )
    assert harm >= 1
    assert plain["errors the application saw"] >= 1


def _assert_no_library_log(text: str) -> None:
    leaked = [line for line in text.splitlines() if LIBRARY_LOG.search(line)]
    assert leaked == [], leaked


def test_lost_commit_reply_doubles_the_usual_advice_not_the_pool() -> None:
    """One fault, short: the COMMIT whose reply is lost is an error for plain psycopg
    (applied all the same), a doubled write for the usual advice, and nothing for the pool;
    ``--json`` parses, the human output goes to stderr without ``\\r`` or log lines."""
    done = _demo("--seconds", "3", "--faults", "lost-commit", "--json", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout + done.stderr
    _assert_no_library_log(done.stderr)
    table = _table(done.stderr)
    _assert_the_pool_alone_keeps_its_promise(table)
    report = json.loads(done.stdout)
    runs = {run["key"]: run for run in report["runs"]}
    assert list(runs) == ["plain", "advice", "pool"]
    assert runs["advice"]["doubled"] >= 1
    assert runs["plain"]["failed_applied"] >= 1
    assert runs["pool"]["kept_promise"] is True
    assert runs["pool"]["operations"] == table["operations"][2]
    assert any(
        re.search(r"resolved through the transaction id [1-9]", note)
        for note in runs["pool"]["notes"]
    )
    for run in runs.values():
        (fault,) = run["faults"]
        assert fault["key"] == "lost-commit"
        assert fault["fired"] is True
    assert report["exit_status"] == 0


@pytest.mark.slow
def test_every_fault_three_ways() -> None:
    """The whole demo, short: a TLS proxy cut, a terminated backend, a lost COMMIT reply,
    a restart and a crash hit each contender; the table shows plain psycopg failing and the
    usual advice doubling or losing writes where the pool does neither. With ``--verbose``
    the library's log lines come after each run, never inside the table."""
    done = _demo("--seconds", "12", "--verbose")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "\r" not in out
    table = _table(done.stdout)
    _assert_the_pool_alone_keeps_its_promise(table)
    runs = done.stdout.split("[1/3]")[1]
    for fault in ("TLS proxy cut", "backend terminated", "lost COMMIT reply", "restart", "crash"):
        assert len(re.findall(rf"^\s+[\d.]+ s  {fault}: (?!did not)", runs, re.M)) == 3
    assert "SSL connection has been closed unexpectedly" in done.stdout
    assert "the library's log during this run" in done.stdout  # --verbose shows them...
    before_table = done.stdout.split("Counted on the server after each run:")
    assert len(before_table) == 2
    _assert_no_library_log(before_table[1])  # ...never after the runs, in the table
    assert "ResilientPool kept its promise" in before_table[1]


def test_no_server_to_start_says_what_to_install(tmp_path: Path) -> None:
    """No server binaries and no Docker: exit status 3 and what to install, no traceback."""
    env = {
        "PATH": str(Path(sys.executable).parent),
        "AIOPG_RESILIENT_PG_BINDIR": str(tmp_path),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [str(SCRIPT), "demo", "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "apt-get install postgresql" in done.stderr
    assert "docker" in done.stderr.lower()
    assert "Traceback" not in done.stdout + done.stderr
