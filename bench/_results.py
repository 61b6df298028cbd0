"""The markdown of run_all.py: where and how it ran (machine, versions, date, parameters,
load), then one table per benchmark, each under its plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from _acquire import Acquire
from _common import POOL_SIZE, WRITE_MODES
from _contenders import BASELINE, Contender
from _faults import FAULTS
from _recovery import Recovery
from _report import error_kinds_text, throughput_table
from _throughput import DISTURBED, Throughput
from _writes import WriteCost

BUSY = 0.05  # other processes above this share of the machine: the run was not idle


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A markdown table: the first *text_columns* columns left-aligned, the rest right."""
    rule = "|" + "---|" * text_columns + "---:|" * (len(head) - text_columns)
    lines = ["| " + " | ".join(head) + " |", rule]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def load_text(meta: dict[str, Any]) -> str:
    load = meta["load"]
    foreign, steal = load.get("foreign"), load.get("steal")
    parts = []
    if foreign is None:
        parts.append("The machine's load was not measured (no /proc).")
    elif foreign > BUSY or (steal or 0) > BUSY:
        parts.append(
            f"**The machine was not idle**: over the whole run, other processes used "
            f"{foreign:.0%} of its CPU time and the hypervisor took {steal or 0:.0%}; "
            f"the worst throughput round saw {load.get('worst_round', 0):.0%} taken by others. "
            "Others' load moves rates by 20-50% or more on 2 cores: the numbers are noisy; "
            "compare the ratios within this run, and re-run on an idle machine for absolute "
            "numbers."
        )
    else:
        parts.append(
            f"The machine was idle apart from the benchmark: other processes used "
            f"{foreign:.0%} of its CPU time, the hypervisor {steal or 0:.0%}."
        )
    parts.append(
        f"Load average at start {load['loadavg_start']}, at the end {load['loadavg_end']}."
    )
    if load.get("note"):
        parts.append(f"Note: {load['note'].rstrip('.')}.")
    return " ".join(parts)


def header(meta: dict[str, Any], contenders: Sequence[Contender]) -> str:
    v, m, s, p = meta["versions"], meta["machine"], meta["server"], meta["params"]
    others = ", ".join(
        f"{k} {v[k]}" for k in ("psycopg_pool", "asyncpg", "sqlalchemy", "matplotlib") if k in v
    )
    lines = [
        "# Benchmarks: aiopg_resilient and the alternatives",
        "",
        f"- **Run**: {meta['date']}, `{meta['command']}` ({p['mode']} mode), {meta['elapsed']} s"
        + (f"; code at {meta['code']}." if meta.get("code") else "."),
        f"- **Machine**: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
        f"{m['system']} {m['kernel']}; Python {v['python']} ({v['event_loop']}).",
        f"- **Server**: PostgreSQL {s['server_version']} ({s['backend']} backend, ssl="
        f"{s['server_ssl']}, fsync={s['fsync']}, synchronous_commit="
        f"{s['synchronous_commit']}) on this machine; every client over TLS "
        "(`sslmode=verify-full`) to 127.0.0.1, in one process, one event loop.",
        f"- **Versions**: aiopg_resilient {v['aiopg_resilient']}, psycopg {v['psycopg']} "
        f"({v['psycopg_impl']}, libpq {v['libpq']}), {others}.",
        "- **Parameters**: " + ", ".join(f"{k}={val}" for k, val in p.items()) + ".",
        f"- **Load**: {load_text(meta)}",
        "",
        "Contenders (pools hold 1 connection at 1 task and "
        f"{POOL_SIZE} above; ratios are over psycopg_pool's default, b):",
        "",
        _table(["", "contender", "what"], [[c.key, c.name, c.describe] for c in contenders], 3),
    ]
    return "\n".join(lines)


def acquire_table(results: Sequence[Acquire]) -> str:
    base = next((r for r in results if r.key == BASELINE), None)
    rows = [
        [
            f"{r.key}. {r.contender}",
            f"{r.p50_us:,.1f}",
            f"{r.p99_us:,.1f}",
            _ratio(None if base is None or not base.p50_us else r.p50_us / base.p50_us),
            str(r.samples),
        ]
        for r in results
    ]
    return _table(["contender", "p50 µs", "p99 µs", "p50 vs psycopg_pool", "samples"], rows)


def writes_table(results: Sequence[WriteCost], concurrencies: Sequence[int]) -> str:
    head = ["contender", "write"]
    for c in concurrencies:
        head += [f"ops/s @{c}", f"vs psycopg_pool @{c}"]
    keys: list[tuple[str, str, str]] = []
    for r in results:
        if (r.key, r.contender, r.mode) not in keys:
            keys.append((r.key, r.contender, r.mode))
    rows = []
    for key, name, mode in keys:
        row = [f"{key}. {name}", WRITE_MODES[mode]]
        for c in concurrencies:
            x = next((r for r in results if (r.key, r.mode, r.concurrency) == (key, mode, c)), None)
            if x is None:
                row += ["—", "—"]
                continue
            cell = f"{x.ops_per_s:,.0f}"
            if x.errors:
                cell += f", {x.errors} errors"
            if not x.rows_match:
                cell += ", **rows ≠ acknowledged writes**"
            row += [cell, _ratio(x.ratio_vs_psycopg_pool)]
        rows.append(row)
    return _table(head, rows, 2)


def _per_contender(
    results: Sequence[Recovery],
    faults: Sequence[str],
    cell: Callable[[list[Recovery]], str],
) -> list[list[str]]:
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.key, r.contender) not in keys:
            keys.append((r.key, r.contender))
    rows = []
    for key, name in sorted(keys):
        row = [f"{key}. {name}"]
        for f in faults:
            runs = [r for r in results if r.key == key and r.fault_key == f]
            row.append(cell(runs) if runs else "—")
        rows.append(row)
    return rows


def _spread(values: Sequence[float], fmt: str) -> str:
    med = format(statistics.median(values), fmt)
    return med if len(values) < 2 else f"{med} (max {format(max(values), fmt)})"


def recovery_table(results: Sequence[Recovery], faults: Sequence[str]) -> str:
    def cell(runs: list[Recovery]) -> str:
        recs = [r.recovery for r in runs if r.recovery is not None]
        never = len(runs) - len(recs)
        text = _spread(recs, ".3f") + " s" if recs else "never"
        return text + (f", {never} never" if never and recs else "")

    head = ["contender"] + [f"{FAULTS[f].name}: ready → first ok" for f in faults]
    return _table(head, _per_contender(results, faults, cell))


def errors_table(results: Sequence[Recovery], faults: Sequence[str]) -> str:
    def cell(runs: list[Recovery]) -> str:
        gap = statistics.median(r.longest_gap for r in runs)
        return f"{_spread([r.errors for r in runs], 'g')} · {gap:.2f} s"

    head = ["contender"] + [FAULTS[f].name for f in faults]
    return _table(head, _per_contender(results, faults, cell))


def markdown(
    meta: dict[str, Any],
    contenders: Sequence[Contender],
    throughput: Sequence[Throughput],
    acquire: Sequence[Acquire],
    writes: Sequence[WriteCost],
    recovery: Sequence[Recovery],
) -> str:
    p = meta["params"]
    out = [header(meta, contenders)]
    if throughput:
        out += [
            "## Read throughput",
            "![Read throughput](throughput.png)",
            f"`SELECT 1` back to back from 1, 16 and 64 tasks, every answer checked; ops/s, "
            f"median of {p['rounds']} interleaved round(s) of {p['seconds'] / p['rounds']:g} s "
            "(lowest-highest round in parentheses). Each `*` marks a round in which other "
            f"processes took more than {DISTURBED:.0%} of the machine.",
            throughput_table(throughput, p["concurrency"]),
        ]
    if acquire:
        out += [
            "## Acquire latency",
            "![Acquire latency](acquire.png)",
            "Borrow an idle connection and give it back, nothing run on it; one task, a pool "
            "of one connection. Raw psycopg has no pool: its number is the `asyncio.Lock` "
            "in front of its held connection, the floor.",
            acquire_table(acquire),
        ]
    if writes:
        out += [
            "## Write cost",
            "![Write cost](writes.png)",
            "One row per operation into a table without constraints. *one INSERT* is each "
            "contender's plainest write: autocommit where it has it (c, d, e, f), "
            "BEGIN/INSERT/COMMIT where it does not (b, g), and for aiopg_resilient the "
            "write-safe `pool.execute()` (never doubled, never lost: BEGIN, INSERT and the "
            "transaction id pipelined, then COMMIT). After each window the table held exactly "
            "the acknowledged rows unless marked.",
            writes_table(writes, p["write_concurrency"]),
        ]
    if recovery:
        down = [f for f in p["faults"] if FAULTS[f].server_down]
        out += [
            "## Recovery after a restart and a crash",
            "![Recovery](recovery.png)",
            f"{p['fault_readers']} reader task(s) per contender ({p['fault_size']} "
            f"connections), reading as fast as they can; an error is counted, then "
            f"the reader waits 10 ms and goes on. Time from the server accepting connections "
            f"again to the first successful read (crash: `stop -m immediate`, "
            f"{p['fault_down']:g} s down, start). "
            + (
                "All contenders faced the same fault at once (quick mode)."
                if p["fault_together"]
                else "One contender at a time."
            ),
            recovery_table(recovery, down),
            "## Errors the application saw under each fault",
            "![Errors](errors.png)",
            f"Errors the readers got from the fault to {p['fault_tail']:g} s after their "
            "first success "
            "(median per run, max if several), then the longest gap between two successful "
            "reads (the outage as the application saw it). The cut goes through a "
            "TLS-terminating proxy (psycopg's `SSL connection has been closed unexpectedly`).",
            errors_table(recovery, p["faults"]),
            "Errors by kind:",
            error_kinds_text(recovery),
        ]
    return "\n\n".join(out) + "\n"
