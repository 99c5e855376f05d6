"""The import graph of `pipelines/` and `vqcore/` runs one way: no cycle between modules,
and no import from a room (subpackage) into one above it. Every import counts, those inside
functions too: a lazy import hides a dependency from the reader, not from the design.

The rooms and their order are `pipelines/__init__.py`'s and `vqcore/__init__.py`'s
docstrings; a room may import its own modules and any room of a lower rank, never a peer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> rank (lowest first); peers share a rank and may not import each other
RANKS = {
    "vqcore.ops": 0,
    "vqcore.quantizers": 1,
    "vqcore.losses": 1,
    "vqcore.references": 1,
    "vqcore.spectral": 1,
    "vqcore.models": 2,
    "vqcore.metrics": 2,
    "vqcore": 3,  # the package's re-exports
    "pipelines.data": 10,
    "pipelines.tracking": 10,
    "pipelines.config": 11,
    "pipelines.cluster": 11,
    "pipelines.store": 12,
    "pipelines.inference": 13,
    "pipelines.training": 14,
    "pipelines.studies": 15,
    "pipelines.demo": 16,
    "pipelines.cli": 17,
    "pipelines": 18,
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for d in ("pipelines", "vqcore") for p in (ROOT / d).rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The modules of this repository that `name` imports, anywhere in its file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")
                keep = len(pkg) - node.level + (MODULES[name].name == "__init__.py")
                base = ".".join(pkg[:keep] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs or [base]
        else:
            continue
        for t in targets:  # `import a.b.c` imports a.b.c; count the module itself
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def room(name: str) -> str:
    while name not in RANKS:
        name = name.rpartition(".")[0]
    return name


def against_layering(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({room(m)}) imports {t} ({room(t)})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if room(m) != room(t) and RANKS[room(t)] >= RANKS[room(m)]
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    found: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_upward_or_sideways_import():
    bad = against_layering(GRAPH)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_checks_catch_planted_violations():
    """The checks can fail: data importing training is upward; loop importing launch closes
    a cycle inside training (launch imports loop)."""
    graph = {m: set(t) for m, t in GRAPH.items()}
    graph["pipelines.data.tars"].add("pipelines.training.loop")
    assert against_layering(graph) == [
        "pipelines.data.tars (pipelines.data) imports pipelines.training.loop (pipelines.training)"
    ]
    graph = {m: set(t) for m, t in GRAPH.items()}
    graph["pipelines.training.loop"].add("pipelines.training.launch")
    assert ["pipelines.training.launch", "pipelines.training.loop",
            "pipelines.training.launch"] in cycles(graph)  # fmt: skip
