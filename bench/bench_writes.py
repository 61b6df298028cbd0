#!/usr/bin/env python
"""The cost of write safety: one row per operation, every way each contender offers.

One throwaway PostgreSQL (``ssl=on``) started by this script; every client over TLS
(``sslmode=verify-full``) to 127.0.0.1. Each contender of ``_contenders.py`` writes one row
per operation (``_writes.py``):

- *one INSERT*: its plainest write. Autocommit where it has it (raw psycopg, asyncpg,
  psycopg_pool autocommit: 1 round trip, and unsafe: a lost answer leaves the write in doubt,
  a retry may double it); BEGIN/INSERT/COMMIT where it does not (psycopg_pool's default,
  SQLAlchemy's ``engine.begin()``); for aiopg_resilient the write-safe ``pool.execute()``
  (BEGIN + INSERT + transaction id pipelined, then COMMIT);
- *BEGIN; INSERT; COMMIT*: the same row in an explicit transaction block
  (``pool.transaction()`` for aiopg_resilient);
- aiopg_resilient only: ``pool.execute(..., idempotent=True)``, replayed like a read.

At concurrency 1 (one connection) and 16 (8 connections). Prints a markdown table of rows/s
and the ratio to psycopg_pool's default. ``run_all.py`` runs this too. Usage::

    .venv/bin/python bench/bench_writes.py [--seconds N] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import setup_logging
from _contenders import CONTENDERS, pick
from _results import writes_table
from _writes import WriteCost, bench_writes

from aiopg_resilient.testing import PostgresServer


async def amain(args: argparse.Namespace) -> list[WriteCost]:
    async with PostgresServer(ssl=True) as pg:
        return await bench_writes(
            pg, pick(args.only), args.concurrency, args.seconds, args.warmup, args.rounds
        )


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measured per cell (3)")
    p.add_argument("--rounds", type=int, default=1, help="rounds the seconds are split over (1)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up per round (0.5)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="tasks (1 16)")
    p.add_argument("--only", nargs="+", choices=[c.key for c in CONTENDERS], help="contenders")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if not 0 < args.seconds <= 60 or not 1 <= args.rounds <= 20 or not 0 <= args.warmup <= 30:
        p.error("--seconds must be in (0, 60], --rounds in [1, 20], --warmup in [0, 30]")
    if any(not 1 <= c <= 1024 for c in args.concurrency):
        p.error("--concurrency must be between 1 and 1024")
    setup_logging()
    results = asyncio.run(amain(args))
    print(writes_table(results, args.concurrency))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
