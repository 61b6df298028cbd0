"""The benchmarks' quick mode, run for real (``bench/run_all.py --quick`` into a temporary
directory): it writes the markdown, the JSON and every plot, and each contender gets a
number in every part. Benchmarks assert no speed: this checks behaviour only (every read
answered right, every acknowledged write in the table, aiopg_resilient's readers saw no
error under any fault)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ("throughput", "acquire", "writes", "recovery", "errors")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    for module in ("psycopg_pool", "asyncpg", "sqlalchemy", "matplotlib"):
        pytest.importorskip(module, reason="the benchmarks need the `bench` extra")
    if os.environ.get("AIOPG_RESILIENT_TEST_DSN"):
        pytest.skip("the benchmark restarts and crashes its own server: not on the env backend")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "# Benchmarks" in proc.stdout  # the markdown goes to stdout too
    return out, json.loads((out / "results.json").read_text())


def test_markdown_and_plots_are_written(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = quick_run
    md = (out / "results.md").read_text()
    for heading in ("Read throughput", "Acquire latency", "Write cost", "Recovery", "Errors"):
        assert f"## {heading}" in md
    for name in PLOTS:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, name
        assert f"]({name}.png)" in md
    meta = result["meta"]
    assert meta["params"]["mode"] == "quick"
    assert meta["server"]["server_ssl"] == "on"
    for line in ("**Run**", "**Machine**", "**Server**", "**Versions**", "**Load**", meta["date"]):
        assert line in md
    for contender in result["contenders"].values():
        assert contender["name"] in md


def test_every_contender_has_a_number(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    keys = set(result["contenders"])
    assert keys == set("abcdefg")
    params = result["meta"]["params"]
    for c in params["concurrency"]:
        cells = {r["key"]: r for r in result["throughput"] if r["concurrency"] == c}
        assert set(cells) == keys
        assert all(r["ops_per_s"] > 0 for r in cells.values())
    assert {r["key"] for r in result["acquire"] if r["p50_us"] > 0 and r["samples"]} == keys
    for c in params["write_concurrency"]:
        for mode in ("insert", "transaction"):
            got = {r["key"] for r in result["writes"] if (r["concurrency"], r["mode"]) == (c, mode)}
            assert got == keys, (c, mode)
    for fault in params["faults"]:
        runs = [r for r in result["recovery"] if r["fault_key"] == fault]
        assert {r["key"] for r in runs} == keys, fault
        assert all(r["recovery"] is not None for r in runs), runs


def test_behaviour_behind_the_numbers(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = quick_run
    # No fault during throughput and writes: every read answered 1, no write failed, and
    # the table held exactly the rows each contender acknowledged.
    assert [r for r in result["throughput"] if r["errors"]] == []
    assert [r for r in result["writes"] if r["errors"] or not r["rows_match"]] == []
    # The library's promise: its readers see no error under any of the faults.
    ours = [r for r in result["recovery"] if r["key"] == "a"]
    assert len(ours) == sum(result["meta"]["params"]["faults"].values())
    assert [r for r in ours if r["errors"]] == []
