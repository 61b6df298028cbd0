"""The PNG plots of run_all.py: grouped bars, one colour per contender across every plot.
Drawn with matplotlib's object API (`Figure`, rendered by Agg): no pyplot, no display."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
from _acquire import Acquire
from _common import WRITE_MODES
from _contenders import CONTENDERS
from _faults import FAULTS
from _recovery import Recovery
from _throughput import Throughput
from _writes import WriteCost
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_PALETTE = matplotlib.colormaps["tab10"].colors  # type: ignore[attr-defined]
COLORS = {c.key: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(CONTENDERS)}

Series = tuple[str, str, list[float | None]]  # (contender key, label, one value per group)
"""A key "a/variant" is drawn in contender a's colour, hatched."""


def _bars(
    path: Path,
    title: str,
    subtitle: str,
    ylabel: str,
    groups: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str],
    scale: str = "linear",
    missing: str | None = "n/a",
    labels: dict[str, list[str]] | None = None,
) -> Path:
    """Grouped bars; a None value is no bar, labelled *missing* (nothing if None);
    *labels* replaces the value labels of the series with that key."""
    fig = Figure(figsize=(11, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    n = max(1, len(series))
    width = 0.84 / n
    tallest = max((v for _, _, vs in series for v in vs if v is not None), default=1.0) or 1.0
    for j, (key, label, values) in enumerate(series):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [0.0 if v is None else v for v in values]
        base, _, variant = key.partition("/")
        colour = COLORS.get(base, "grey")
        ax.bar(xs, ys, width * 0.95, label=label, color=colour, hatch="//" if variant else None)
        for i, (x, v) in enumerate(zip(xs, values, strict=True)):
            if v is None and missing is None:
                continue
            text = (missing or "") if v is None else fmt(v)
            ax.annotate(
                labels[key][i] if labels and key in labels else text,
                (x, 0.0 if v is None else v),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
            )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if scale == "symlog":
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(0, tallest * 8)
    elif scale == "log":
        ax.set_yscale("log")
        ax.set_ylim(top=tallest * 8)
    else:
        ax.set_ylim(0, tallest * (1.6 if labels else 1.3))
    ax.set_title(f"{title}\n{subtitle}", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _names(items: Sequence[Throughput | Acquire | WriteCost | Recovery]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for r in items:
        if (r.key, r.contender) not in seen:
            seen.append((r.key, r.contender))
    return sorted(seen)


def throughput_png(
    results: Sequence[Throughput], concurrencies: Sequence[int], path: Path, subtitle: str
) -> Path:
    series: list[Series] = []
    for key, name in _names(results):
        by_c = {r.concurrency: r.ops_per_s for r in results if r.key == key}
        series.append((key, name, [by_c.get(c) for c in concurrencies]))
    groups = [f"{c} task{'s' if c > 1 else ''}" for c in concurrencies]
    return _bars(
        path,
        "Read throughput: SELECT 1, answers checked",
        subtitle,
        "ops/s (higher is better)",
        groups,
        series,
        lambda v: f"{v:,.0f}",
    )


def acquire_png(results: Sequence[Acquire], path: Path, subtitle: str) -> Path:
    series: list[Series] = [(r.key, r.contender, [r.p50_us, r.p99_us]) for r in results]
    return _bars(
        path,
        "Acquire latency: borrow an idle connection and return it",
        subtitle,
        "µs (lower is better, log scale)",
        ["p50", "p99"],
        series,
        lambda v: f"{v:,.0f}" if v >= 10 else f"{v:.1f}",
        "log",
    )


def writes_png(
    results: Sequence[WriteCost], concurrencies: Sequence[int], path: Path, subtitle: str
) -> Path:
    # Groups: one INSERT and a transaction block at each concurrency; ours with
    # idempotent=True is a hatched bar of its own next to the one-INSERT groups.
    cells = [(m, c) for m in ("insert", "transaction") for c in concurrencies]
    series: list[Series] = []
    for key, name in _names(results):
        got = {(r.mode, r.concurrency): r.ops_per_s for r in results if r.key == key}
        series.append((key, name, [got.get(cell) for cell in cells]))
        if any(mode == "idempotent" for mode, _ in got):
            series.append(
                (
                    f"{key}/idempotent",
                    f"{name} {WRITE_MODES['idempotent'].split(', ')[1]}",
                    [got.get(("idempotent", c)) if m == "insert" else None for m, c in cells],
                )
            )
    groups = [f"{WRITE_MODES[m]}\n{c} task{'s' if c > 1 else ''}" for m, c in cells]
    return _bars(
        path,
        "Write cost: one row per operation",
        subtitle,
        "rows/s (higher is better)",
        groups,
        series,
        lambda v: f"{v:,.0f}",
        missing=None,
    )


def _by_fault(
    results: Sequence[Recovery], faults: Sequence[str], value: Callable[[list[Recovery]], float]
) -> list[Series]:
    series: list[Series] = []
    for key, name in _names(results):
        values: list[float | None] = []
        for f in faults:
            runs = [r for r in results if r.key == key and r.fault_key == f]
            values.append(value(runs) if runs else None)
        series.append((key, name, values))
    return series


def recovery_png(
    results: Sequence[Recovery], faults: Sequence[str], path: Path, subtitle: str
) -> Path:
    def median_recovery(runs: list[Recovery]) -> float:
        recs = [r.recovery for r in runs if r.recovery is not None]
        return statistics.median(recs) if recs else float("nan")

    series = [
        (k, n, [None if v is None or v != v else v for v in vs])
        for k, n, vs in _by_fault(results, faults, median_recovery)
    ]
    errors = _by_fault(results, faults, lambda runs: statistics.median(r.errors for r in runs))
    labels = {
        k: [
            "n/a" if e is None else f"{'never' if v is None else f'{v:.3f} s'}, {e:g} errors"
            for v, e in zip(vs, es, strict=True)
        ]
        for (k, _, vs), (_, _, es) in zip(series, errors, strict=True)
    }
    return _bars(
        path,
        "Recovery: server ready -> first successful read (median), and the errors seen",
        subtitle,
        "seconds (lower is better)",
        [FAULTS[f].name for f in faults],
        series,
        lambda v: f"{v:.3f}",
        labels=labels,
    )


def errors_png(
    results: Sequence[Recovery], faults: Sequence[str], path: Path, subtitle: str
) -> Path:
    series = _by_fault(results, faults, lambda runs: statistics.median(r.errors for r in runs))
    groups = [FAULTS[f].name.replace(" (", "\n(") for f in faults]
    return _bars(
        path,
        "Errors the application saw under each fault (median per run)",
        subtitle,
        "errors (lower is better, symlog scale)",
        groups,
        series,
        lambda v: f"{v:g}",
        "symlog",
    )
