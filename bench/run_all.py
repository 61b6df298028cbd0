#!/usr/bin/env python
"""Every benchmark in one run, one process, against one throwaway PostgreSQL (``ssl=on``):
aiopg_resilient against raw psycopg, psycopg_pool (default, autocommit, with ``check``),
asyncpg's pool and SQLAlchemy's async engine (psycopg, ``pool_pre_ping=True``).

1. read throughput at 1, 16 and 64 tasks (``SELECT 1``, answers checked);
2. acquire latency (borrow and return an idle connection; p50, p99);
3. write cost (one row per operation: one INSERT, and in a transaction);
4. recovery after a fast restart and a crash (server ready -> first successful read), and
   the errors the application saw under each fault (a proxy cut, terminated backends, the
   restart, the crash) while reader tasks run.

Writes ``results.md`` (machine, versions, date, parameters, load, one table per benchmark),
``results.json`` and the PNG plots to ``--out`` (default ``docs/benchmarks``); prints the
markdown to stdout, progress to stderr. Usage::

    .venv/bin/python bench/run_all.py [--quick] [--out DIR] [--note TEXT]

``--quick`` runs every part briefly (all contenders face each fault at once): a smoke test
whose numbers mean nothing. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _plots
from _acquire import Acquire, bench_acquire
from _common import log, setup_logging
from _contenders import CONTENDERS, pick
from _cpu_meter import CpuMeter
from _faults import FAULTS
from _machine import code_version, loadavg, machine, server_info, versions
from _recovery import FaultPlan, Recovery, bench_recovery
from _results import BUSY, markdown
from _throughput import Throughput, bench_throughput
from _writes import WriteCost, bench_writes

from aiopg_resilient.testing import ChaosProxy, PostgresServer

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("throughput", "acquire", "writes", "faults")
FULL: dict[str, Any] = {
    "mode": "full",
    "concurrency": [1, 16, 64],
    "seconds": 1.5,  # measured per throughput cell, all rounds together
    "rounds": 3,
    "warmup": 0.2,
    "makeup_budget": 15.0,
    "acquire_count": 3000,
    "acquire_rounds": 3,
    "write_concurrency": [1, 16],
    "write_seconds": 1.0,
    "write_rounds": 2,
    "faults": {"cut": 1, "terminate": 1, "restart": 2, "crash": 1},
    "fault_readers": 4,
    "fault_size": 4,
    "fault_warmup": 0.3,
    "fault_tail": 1.0,
    "fault_down": 2.0,
    "fault_together": False,
}
QUICK: dict[str, Any] = {
    **FULL,
    "mode": "quick",
    "seconds": 0.15,
    "rounds": 1,
    "warmup": 0.05,
    "makeup_budget": 0.0,
    "acquire_count": 200,
    "acquire_rounds": 1,
    "write_seconds": 0.15,
    "write_rounds": 1,
    "faults": {"cut": 1, "terminate": 1, "restart": 1, "crash": 1},
    "fault_readers": 2,
    "fault_size": 2,
    "fault_warmup": 0.2,
    "fault_tail": 0.3,
    "fault_down": 0.3,
    "fault_together": True,
}


async def amain(args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    contenders = pick(args.only)
    skip = set(args.skip or ())
    started = time.monotonic()
    loadavg_start = loadavg()
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "bench/run_all.py", *args.argv]),
        "code": await asyncio.to_thread(code_version, ROOT),
        "versions": versions(),
        "machine": machine(),
        "params": params,
    }
    empty: list[Any] = []
    throughput, acquire, writes, recovery = empty, empty, empty, empty
    async with PostgresServer(ssl=True) as pg:
        meta["server"] = await server_info(pg)
        log.info("PostgreSQL %s on %s:%d", meta["server"]["server_version"], pg.host, pg.port)
        meter = CpuMeter(pg)
        meter.start()
        p = params
        if "throughput" not in skip:
            throughput = await bench_throughput(
                pg,
                contenders,
                p["concurrency"],
                p["seconds"],
                p["warmup"],
                p["rounds"],
                p["makeup_budget"],
            )
        if "acquire" not in skip:
            acquire = await bench_acquire(pg, contenders, p["acquire_count"], p["acquire_rounds"])
        if "writes" not in skip:
            writes = await bench_writes(
                pg,
                contenders,
                p["write_concurrency"],
                p["write_seconds"],
                p["warmup"],
                p["write_rounds"],
            )
        if "faults" not in skip:
            plan = FaultPlan(
                reps=p["faults"],
                readers=p["fault_readers"],
                size=p["fault_size"],
                warmup=p["fault_warmup"],
                tail=p["fault_tail"],
                down=p["fault_down"],
                together=p["fault_together"],
            )
            async with ChaosProxy.for_server(pg, tls=True) as proxy:
                recovery = await bench_recovery(pg, proxy, contenders, plan)
        load = meter.stop()
    worst = [r.max_foreign_load for r in throughput if r.max_foreign_load is not None]
    meta["load"] = {
        "foreign": None if load is None else round(load.foreign, 3),
        "steal": None if load is None else round(load.steal, 3),
        "worst_round": max(worst, default=0.0),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "note": args.note,
    }
    meta["elapsed"] = round(time.monotonic() - started, 1)
    return {
        "meta": meta,
        "contenders": {c.key: {"name": c.name, "what": c.describe} for c in contenders},
        "throughput": throughput,
        "acquire": acquire,
        "writes": writes,
        "recovery": recovery,
        "_contenders": contenders,
    }


def load_json(path: Path) -> dict[str, Any]:
    """A run's results back from its results.json (for --replot)."""
    data = json.loads(path.read_text())
    parts = {"throughput": Throughput, "acquire": Acquire, "writes": WriteCost}
    result = {k: [cls(**x) for x in data[k]] for k, cls in parts.items()}
    result["recovery"] = [Recovery(**x) for x in data["recovery"]]
    return {**data, **result, "_contenders": pick(list(data["contenders"]))}


def write_outputs(result: dict[str, Any], out: Path) -> tuple[str, list[Path]]:
    meta, p = result["meta"], result["meta"]["params"]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(
        meta,
        result["_contenders"],
        result["throughput"],
        result["acquire"],
        result["writes"],
        result["recovery"],
    )
    (out / "results.md").write_text(text)
    data = {
        k: [asdict(x) for x in v] if isinstance(v, list) else v
        for k, v in result.items()
        if not k.startswith("_")
    }
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    foreign = meta["load"]["foreign"]
    busy = (
        "load not measured"
        if foreign is None
        else (
            f"machine busy: others used {foreign:.0%} of the CPU"
            if foreign > BUSY
            else "idle machine"
        )
    )
    sub = f"{meta['date']}, {p['mode']} run, {meta['machine']['cpus']} CPUs, {busy}"
    down = [f for f in p["faults"] if FAULTS[f].server_down]
    pngs = []
    if result["throughput"]:
        pngs.append(
            _plots.throughput_png(
                result["throughput"], p["concurrency"], out / "throughput.png", sub
            )
        )
    if result["acquire"]:
        pngs.append(_plots.acquire_png(result["acquire"], out / "acquire.png", sub))
    if result["writes"]:
        pngs.append(
            _plots.writes_png(result["writes"], p["write_concurrency"], out / "writes.png", sub)
        )
    if result["recovery"]:
        pngs.append(_plots.recovery_png(result["recovery"], down, out / "recovery.png", sub))
        pngs.append(
            _plots.errors_png(result["recovery"], list(p["faults"]), out / "errors.png", sub)
        )
    return text, pngs


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few seconds per part: a smoke test")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="directory for results.md, results.json and the PNGs (docs/benchmarks)",
    )
    p.add_argument("--only", nargs="+", choices=[c.key for c in CONTENDERS], help="contenders")
    p.add_argument("--skip", nargs="+", choices=PARTS, help="parts to leave out")
    p.add_argument("--note", help="a sentence for the report's load line (what else ran)")
    p.add_argument(
        "--replot",
        action="store_true",
        help="run nothing: redo results.md and the PNGs from OUT/results.json",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' warnings")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    params = dict(QUICK if args.quick else FULL)
    if args.replot:
        result = load_json(args.out / "results.json")
    else:
        result = asyncio.run(amain(args, params))
    text, pngs = write_outputs(result, args.out)
    sys.stdout.write(text)
    sys.stdout.flush()
    log.info("wrote %s, results.json and %s", args.out / "results.md", [p.name for p in pngs])
    log.info("total %.1f s", result["meta"]["elapsed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
