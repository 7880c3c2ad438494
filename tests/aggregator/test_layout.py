"""The layout's rules, read from the source: no import circle between the modules of the
aggregator, the contract, the edge agent and the simulators (nor between the aggregator's
subsystems and the simulators), ingest imports nothing above it, and no SQL outside
``aggregator/pool/`` and ``aggregator/access/`` (the edge agent's own outbox database aside).

Imports are read with ``ast``, every one of them: at module level, inside functions (a lazy
import is still a dependency) and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("aggregator", "contract", "edge", "simulators")

# What each aggregator subsystem may import of the others (besides the small shared modules
# at aggregator/ top level). Ingest is below the operator side: fanout serves its metrics.
INGEST_MAY_NOT = ("aggregator.fanout", "aggregator.api", "aggregator.cli", "aggregator.service")

# A statement opening a string as the pool's modules write them: upper-case keywords.
_SQL = re.compile(
    r"""["']\s*(SELECT\s+[\w*(]|INSERT\s+INTO\s|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s|"""
    r"""CREATE\s+(TABLE|INDEX|UNIQUE\s+INDEX)\s)"""
)


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The known modules ``name`` imports (its own ancestor packages are not edges: they are
    initialised before it anyway)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")
                if path.name != "__init__.py":
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                yield target


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def subsystem(module: str) -> str:
    """An aggregator subpackage or top-level module (config, service, grids…), else the
    top-level package (contract, edge, simulators)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "aggregator" else parts[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(name, path, known)) for name, path in known.items()}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_modules_nor_subsystems() -> None:
    modules_graph = graph()
    assert len(modules_graph) > 100  # the walk read the tree
    assert cycles(modules_graph) == []
    subsystems: dict[str, set[str]] = {}
    for a, targets in modules_graph.items():
        subsystems.setdefault(subsystem(a), set()).update(
            subsystem(b) for b in targets if subsystem(b) != subsystem(a)
        )
    assert cycles(subsystems) == []


def test_ingest_imports_nothing_above_it() -> None:
    upward = {
        (a, b)
        for a, targets in graph().items()
        if a.startswith("aggregator.ingest")
        for b in targets
        if b.startswith(INGEST_MAY_NOT)
    }
    assert upward == set()


def test_no_sql_outside_the_pool_and_access() -> None:
    assert _SQL.search('"SELECT id FROM events"')  # the pattern finds what it should
    assert not _SQL.search('"select a value from the list"')
    found = []
    for name, path in modules().items():
        if name.startswith(("aggregator.pool", "aggregator.access", "edge.outbox")):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _SQL.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
