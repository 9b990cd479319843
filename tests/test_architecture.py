"""The package's architecture: no import cycles (imports inside functions count), and the layers of
``pyproject.toml``'s import-linter contracts kept (CI also runs ``lint-imports``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).parent.parent


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """The groups of modules that import each other, directly or not (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            groups.append(group)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    # annotations under TYPE_CHECKING never run: an operation's signature may name the dataset it takes
    graph = grimp.build_graph("dask_clip", exclude_type_checking_imports=True, cache_dir=None)
    cycles = [sorted(group) for group in strongly_connected(graph) if len(group) > 1]
    assert cycles == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert sorted(sorted(group) for group in strongly_connected(graph) if len(group) > 1) == [["a", "b"]]


def test_import_linter_contracts_are_kept() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


COMPUTING_CALLS = {"compute", "persist", "map_partitions"}
"""Dask calls that run or map work: only ``execution.py`` makes them (``execution.compute``, ``map_shards``...)."""
ALLOWED_OUTSIDE_EXECUTION = {
    "dask_clip/backends.py": {"map_partitions"},  # converting each partition to and from cudf, lazily
}


def computing_calls(path: Path) -> list[tuple[int, str]]:
    """The line and name of every ``x.compute(...)``, ``x.persist(...)`` or ``x.map_partitions(...)`` in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, node.func.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COMPUTING_CALLS
    ]


def test_only_execution_computes_or_maps_partitions() -> None:
    found = []
    for path in sorted((ROOT / "dask_clip").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative == "dask_clip/execution.py":
            continue
        allowed = next(
            (names for prefix, names in ALLOWED_OUTSIDE_EXECUTION.items() if relative.startswith(prefix)), set()
        )
        found += [f"{relative}:{line}: .{name}(" for line, name in computing_calls(path) if name not in allowed]
    assert found == [], "compute or map through dask_clip.execution (compute, map_shards, map_shuffled):\n" + "\n".join(
        found
    )


def test_the_call_finder_finds_computing_calls(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("x = frame.map_partitions(f, meta=m)\ny = dask.compute(x)[0]\nz = compute(x)\nw = x.sum()\n")
    assert computing_calls(module) == [(1, "map_partitions"), (2, "compute")]
