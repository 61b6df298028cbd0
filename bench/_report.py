"""The markdown report of bench_reads.py: the header line, the throughput and recovery
tables and the errors the readers saw."""

from __future__ import annotations

import argparse
import collections
import statistics
from collections.abc import Sequence
from typing import Any

from _common import POOL_SIZE
from _recovery import Recovery
from _throughput import DISTURBED, MIN_CLEAN_ROUNDS, Throughput


def _fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def throughput_table(results: Sequence[Throughput], concurrencies: Sequence[int]) -> str:
    head = ["contender"]
    for c in concurrencies:
        head += [f"ops/s @{c}", f"vs psycopg_pool @{c}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen: list[str] = []
    for r in results:
        if r.key not in seen:
            seen.append(r.key)
    for key in seen:
        row = [next(r.contender for r in results if r.key == key)]
        row[0] = f"{key}. {row[0]}"
        for c in concurrencies:
            cell = next((x for x in results if x.key == key and x.concurrency == c), None)
            if cell is None:
                row += ["—", "—"]
                continue
            ops = f"{cell.ops_per_s:,.0f}"
            if len(cell.round_ops_per_s) > 1:
                ops += f" ({min(cell.round_ops_per_s):,.0f}-{max(cell.round_ops_per_s):,.0f})"
            if cell.rounds_disturbed:
                ops += " " + "*" * cell.rounds_disturbed
            if cell.errors:
                ops += f", {cell.errors} errors"
            ratio = (
                "—" if cell.ratio_vs_psycopg_pool is None else f"{cell.ratio_vs_psycopg_pool:.2f}"
            )
            row += [ops, ratio]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def recovery_table(results: Sequence[Recovery]) -> str:
    head = [
        "fault",
        "contender",
        "runs",
        "ready → first ok: median",
        "max",
        "errors seen: median",
        "max",
        "total",
        "longest gap between ok reads: median",
        "ready (postmaster.pid) → first ok: median",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.fault, r.contender) not in keys:
            keys.append((r.fault, r.contender))
    for fault, name in keys:
        runs = [r for r in results if r.fault == fault and r.contender == name]
        recs = [r.recovery for r in runs if r.recovery is not None]
        failed = len(runs) - len(recs)
        errs = [r.errors for r in runs]
        files = [r.recovery_from_ready_file for r in runs if r.recovery_from_ready_file is not None]
        row = [
            fault,
            name,
            str(len(runs)),
            (_fmt_s(statistics.median(recs)) if recs else "—")
            + (f" ({failed} never)" if failed else ""),
            _fmt_s(max(recs)) if recs else "—",
            f"{statistics.median(errs):g}",
            str(max(errs)),
            str(sum(errs)),
            _fmt_s(statistics.median(r.longest_gap for r in runs)),
            _fmt_s(statistics.median(files)) if files else "—",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def error_kinds_text(results: Sequence[Recovery]) -> str:
    merged: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in results:
        merged[r.contender].update(r.error_kinds)
    lines = []
    for name, kinds in merged.items():
        for kind, n in kinds.most_common(6):
            lines.append(f"- {name}: {n} x `{kind}`")
    return "\n".join(lines) if lines else "- none"


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    throughput, recovery = result["_objects"]
    meta = result["meta"]
    v = meta["versions"]
    out = [
        "# aiopg_resilient read benchmarks",
        "",
        f"PostgreSQL {meta['server_version']} (ssl={meta['server_ssl']}, "
        f"{meta['backend']} backend), "
        f"all clients over TLS to 127.0.0.1; Python {v['python']} ({v['event_loop']}), "
        f"{v['cpus']} CPUs; aiopg_resilient {v['aiopg_resilient']}, psycopg {v['psycopg']} "
        f"({v['psycopg_impl']}, libpq {v['libpq']}), psycopg_pool {v['psycopg_pool']}, "
        f"asyncpg {v['asyncpg']}, SQLAlchemy {v.get('sqlalchemy', '?')}. "
        f"Total run {meta['elapsed']} s.",
    ]
    if throughput:
        tls = sorted({r.tls for r in throughput})
        steals = [r.max_steal for r in throughput if r.max_steal is not None]
        foreign = [r.max_foreign_load for r in throughput if r.max_foreign_load is not None]
        out += [
            "",
            f"## Throughput of `SELECT 1` (ops/s; {args.seconds:g} s measured per cell over "
            f"{args.rounds} interleaved round(s), each after {args.warmup:g} s of warm-up; "
            f"1 connection at concurrency 1, {POOL_SIZE} above; TLS: {', '.join(tls)})",
            "",
            "Median of the rounds; in parentheses the lowest and highest round. "
            f"Each `*` marks a round during which other processes or the hypervisor took more "
            f"than {DISTURBED:.0%} of the machine; such rounds are left out of the median "
            "while two clean ones remain, and cells with fewer than "
            f"{MIN_CLEAN_ROUNDS} clean rounds got make-up rounds "
            f"(within {args.makeup_budget:g} s). "
            + (
                f"Other processes took at most {max(foreign):.0%} of the machine during a "
                f"round, the hypervisor at most {max(steals):.0%}."
                if steals and foreign
                else ""
            ),
            "",
            throughput_table(throughput, args.concurrency),
        ]
    if recovery:
        out += [
            "",
            "## Recovery (one reader task; 4 connections, otherwise default settings; "
            "errors counted, then 10 ms before the next read)",
            "",
            recovery_table(recovery),
            "",
            "Errors seen by the readers:",
            "",
            error_kinds_text(recovery),
        ]
    return "\n".join(out) + "\n"
