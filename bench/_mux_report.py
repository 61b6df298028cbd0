"""The report of bench_multiplex.py: its cells, the markdown table, the two targets, the
header of ``docs/benchmarks/multiplex.md`` and the plot ``multiplex.png`` (matplotlib's
object API rendered by Agg, as in `_plots`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from _results import BUSY, load_text
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

RAW = "raw"  # the key of the reference: raw psycopg, held connections
MULTIPLEX = "multiplex"
CONTENDER_NAMES = {
    MULTIPLEX: "aiopg_resilient multiplex",
    "resilient": "aiopg_resilient",
    RAW: "raw psycopg, held",
    "psycopg_pool": "psycopg_pool autocommit",
}
DESCRIBE = {
    MULTIPLEX: "`ResilientPool(min_size=1, max_size=n, multiplex=True)`: "
    "`await pool.fetchval(...)`; reads in flight together share connections in pipeline mode",
    "resilient": "the same with `multiplex=False` (the default): one read per connection",
    RAW: "n `AsyncConnection(autocommit=True)` opened beforehand, no pool: task i on "
    "connection i % n behind an `asyncio.Lock` (one query in flight each)",
    "psycopg_pool": "`AsyncConnectionPool(min_size=max_size=n, kwargs={'autocommit': True})`: "
    "`async with pool.connection() as conn: await conn.execute(...)`",
}
TARGET_TASKS = 32
TARGET_RAW_SIZE = 8  # both targets compare with raw held connections of this many
TARGETS = ((8, 1.3), (2, 1.0))  # (multiplex max_size, least ratio over raw held 8)

_PALETTE = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]
# The colours of run_all.py's plots (a, d, c); multiplexing is aiopg_resilient's, solid.
_STYLE: dict[str, tuple[Any, str, float]] = {
    MULTIPLEX: (_PALETTE[0], "-", 2.6),
    "resilient": (_PALETTE[0], "--", 1.6),
    RAW: (_PALETTE[3], "-", 1.6),
    "psycopg_pool": (_PALETTE[2], ":", 1.8),
}


@dataclass
class Cell:
    """One contender at one pool size and one number of tasks, over every round."""

    size: int
    """The contender's max_size (raw psycopg and psycopg_pool: the connections it holds)."""
    tasks: int
    key: str
    contender: str
    ops_per_s: float
    """Median of the rounds' rates."""
    round_ops_per_s: list[float]
    connections: int
    """Server connections used: aiopg_resilient the peak of ``pool.stats.size`` sampled
    during the run (the most over the rounds), the others their size."""
    errors: int
    first_error: str | None
    rounds_disturbed: int
    """Rounds during which other processes or the hypervisor took more than 10% of the
    machine."""
    max_foreign_load: float | None
    ratio_vs_raw: float | None = None
    """ops_per_s over raw held connections' with the same size and tasks."""


def find(cells: Sequence[Cell], key: str, size: int, tasks: int) -> Cell | None:
    return next((c for c in cells if (c.key, c.size, c.tasks) == (key, size, tasks)), None)


def set_ratios(cells: Sequence[Cell]) -> None:
    for c in cells:
        raw = find(cells, RAW, c.size, c.tasks)
        if raw is not None and raw.ops_per_s > 0:
            c.ratio_vs_raw = round(c.ops_per_s / raw.ops_per_s, 3)


def table(cells: Sequence[Cell]) -> str:
    lines = [
        "| max connections | tasks | contender | ops/s | vs raw held (same size) "
        "| server connections |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for c in cells:
        ops = f"{c.ops_per_s:,.0f}"
        if len(c.round_ops_per_s) > 1:
            ops += f" ({min(c.round_ops_per_s):,.0f}-{max(c.round_ops_per_s):,.0f})"
        ops += " " + "*" * c.rounds_disturbed if c.rounds_disturbed else ""
        ops += f", {c.errors} errors" if c.errors else ""
        ratio = "—" if c.ratio_vs_raw is None else f"{c.ratio_vs_raw:.2f}"
        lines.append(
            f"| {c.size} | {c.tasks} | {c.contender} | {ops} | {ratio} | {c.connections} |"
        )
    return "\n".join(lines)


def targets(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The two targets at 32 tasks: multiplex over at most 8 connections, then at most 2,
    against 8 raw held connections; each with its line of text."""
    raw = find(cells, RAW, TARGET_RAW_SIZE, TARGET_TASKS)
    out = []
    for size, least in TARGETS:
        mux = find(cells, MULTIPLEX, size, TARGET_TASKS)
        head = f"{TARGET_TASKS} tasks, max {size}: multiplex"
        goal = f"(target >= {least:.1f})"
        if mux is None or raw is None or raw.ops_per_s <= 0:
            missing = [f"multiplex at max {size}"] if mux is None else []
            missing += [f"raw held {TARGET_RAW_SIZE}"] if raw is None else []
            text = f"{head} ? ops/s = ? x raw held {TARGET_RAW_SIZE} {goal}: not measured "
            text += f"({' and '.join(missing) or 'no raw reads'} at {TARGET_TASKS} tasks)"
            out.append(
                {"size": size, "tasks": TARGET_TASKS, "target": least, "met": None, "text": text}
            )
            continue
        ratio = mux.ops_per_s / raw.ops_per_s
        met = ratio >= least
        text = (
            f"{head} {mux.ops_per_s:,.0f} ops/s = {ratio:.2f} x raw held {TARGET_RAW_SIZE} "
            f"{goal}: {'met' if met else 'MISSED'}; multiplex used {mux.connections} server "
            f"connection{'s' if mux.connections != 1 else ''}, raw held {TARGET_RAW_SIZE} "
            f"did {raw.ops_per_s:,.0f} ops/s"
        )
        out.append(
            {
                "size": size,
                "tasks": TARGET_TASKS,
                "target": least,
                "multiplex_ops_per_s": mux.ops_per_s,
                "raw_held_ops_per_s": raw.ops_per_s,
                "ratio": round(ratio, 3),
                "met": met,
                "connections": mux.connections,
                "text": text,
            }
        )
    return out


def busy_text(meta: dict[str, Any]) -> str:
    foreign = meta["load"]["foreign"]
    if foreign is None:
        return "load not measured"
    return f"machine busy: others used {foreign:.0%} of the CPU" if foreign > BUSY else "idle"


def markdown(meta: dict[str, Any], cells: Sequence[Cell], goals: Sequence[dict[str, Any]]) -> str:
    v, m, s, p = meta["versions"], meta["machine"], meta["server"], meta["params"]
    rows = [f"| {CONTENDER_NAMES[k]} | {d} |" for k, d in DESCRIBE.items()]
    out = [
        "# Multiplexed reads: aiopg_resilient `multiplex=True` and the alternatives",
        "\n".join(
            [
                f"- **Run**: {meta['date']}, `{meta['command']}`, {meta['elapsed']} s.",
                f"- **Machine**: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
                f"{m['system']} {m['kernel']}; Python {v['python']} ({v['event_loop']}).",
                f"- **Server**: PostgreSQL {s['server_version']} ({s['backend']} backend, "
                f"ssl={s['server_ssl']}) on this machine; every client over TLS ({meta['tls']}) "
                "to 127.0.0.1, in one process, one event loop.",
                f"- **Versions**: aiopg_resilient {v['aiopg_resilient']}, psycopg "
                f"{v['psycopg']} ({v['psycopg_impl']}, libpq {v['libpq']}), psycopg_pool "
                f"{v['psycopg_pool']}, matplotlib {v.get('matplotlib', '?')}.",
                "- **Parameters**: " + ", ".join(f"{k}={val}" for k, val in p.items()) + ".",
                f"- **Load**: {load_text(meta)}",
            ]
        ),
        "## Targets",
        "\n".join(f"- {g['text']}" for g in goals),
        "![Multiplexed reads](multiplex.png)",
        f"`SELECT 1` back to back from each number of tasks, every answer checked; ops/s, "
        f"median of {p['rounds']} interleaved round(s) of {p['seconds']:g} s after "
        f"{p['warmup']:g} s of warm-up, each round opening the contender afresh (lowest-"
        "highest round in parentheses; each `*` marks a round in which other processes took "
        "more than 10% of the machine). *vs raw held* is over raw psycopg with as many held "
        "connections as the row's max connections, at the same number of tasks. *server "
        "connections*: for aiopg_resilient the most `pool.stats.size` reached during the "
        "run, sampled every few ms; the others hold all of theirs from the start.",
        "| contender | what |\n|---|---|\n" + "\n".join(rows),
        table(cells),
    ]
    return "\n\n".join(out) + "\n"


def plot(
    cells: Sequence[Cell], sizes: Sequence[int], tasks: Sequence[int], path: Path, subtitle: str
) -> Path:
    """One subplot per max_size: ops/s against tasks (log x), one line per contender, the
    multiplexed points labelled with the server connections they used."""
    fig = Figure(figsize=(4.6 * len(sizes) + 1.0, 5.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    top = max((c.ops_per_s for c in cells), default=1.0) or 1.0
    for ax, size in zip(axes, sizes, strict=True):
        for key, name in CONTENDER_NAMES.items():
            points = [(t, find(cells, key, size, t)) for t in tasks]
            xs = [t for t, c in points if c is not None]
            ys = [c.ops_per_s for _, c in points if c is not None]
            colour, line, width = _STYLE[key]
            ax.plot(
                xs,
                ys,
                line,
                color=colour,
                lw=width,
                marker="o",
                ms=4,
                label=name,
                zorder=3 if key == MULTIPLEX else 2,
            )
            if key == MULTIPLEX:
                for t, c in points:
                    if c is not None:
                        ax.annotate(
                            f"{c.connections}c",
                            (t, c.ops_per_s),
                            xytext=(0, 6),
                            textcoords="offset points",
                            ha="center",
                            fontsize=7,
                            color=colour,
                            zorder=4,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"},
                        )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(list(tasks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in tasks])
        ax.set_xlim(min(tasks) / 1.5, max(tasks) * 1.5)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"max_size = {size}", fontsize=10)
        ax.set_xlabel("concurrent tasks (log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ops/s (higher is better)")
    axes[0].yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    fig.suptitle(
        "Multiplexed reads: SELECT 1, answers checked "
        "(labels: server connections multiplex used)\n" + subtitle,
        fontsize=11,
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, format="png")
    return path
