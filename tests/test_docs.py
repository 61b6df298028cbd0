"""The docs stay true to the code: links resolve, the configuration table lists every
argument with its default, every example is run by a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from aiopg_resilient import ResilientPool

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of *path*."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            text = re.sub(r"[^\w\- ]", "", text)
            anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in _LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        exists = path.exists()
        if not exists or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert broken == [], f"{doc.name}: broken links {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_placeholder_left(doc: Path) -> None:
    left = [line for line in doc.read_text().splitlines() if "PLACEHOLDER" in line]
    assert left == []


def test_configuration_table_lists_every_argument_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[1]
    params = inspect.signature(ResilientPool).parameters
    assert set(rows) == set(params), set(rows) ^ set(params)
    for name, param in params.items():
        default = param.default
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            shown = re.findall(r"\d+(?:\.\d+)?", rows[name])
            assert any(float(s) == float(default) for s in shown), (name, default, rows[name])
        elif isinstance(default, str) and default:
            assert default in rows[name], (name, default, rows[name])
        elif default is None:
            assert "None" in rows[name], (name, rows[name])


def test_every_example_is_run_by_a_test() -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert examples
    unrun = [p.name for p in examples if p.stem not in tests]
    assert unrun == []
