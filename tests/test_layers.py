"""The import rules of the tree (../shared/DESIGN.md): no cycles, each layer imports only the layers below it.

Imports are read from the source (every `import`, at module level or inside a function, outside `if
TYPE_CHECKING:`), so a rule broken by a lazy import is caught too. The wire types between the API process and
the engine core process must import without torch: the API process should not need it to speak to the engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "engine_builder")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from package import name` that is a module counts as that module)."""
    tree = ast.parse(path.read_text())
    type_checking_lines = {
        child.lineno for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test).endswith(
            "TYPE_CHECKING") for child in ast.walk(node) if isinstance(child, ast.stmt)}  # the imports' lines
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in type_checking_lines:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = [path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py")]
    known = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, known) - {module_name(path)} for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported] if imported in path else [module, imported]
            if imported not in state and (cycle := visit(imported, [*path, imported])) is not None:
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])) is not None:
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:  # the rule above must be able to fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


ENGINE_SIDE = ("server.engine", "server.runner")  # runs in the engine core process (or its thread)
FORBIDDEN_FOR_ENGINE_SIDE = ("server.api", "server.cli", "server.launch", "server.config")


@pytest.mark.parametrize("forbidden", FORBIDDEN_FOR_ENGINE_SIDE)
def test_the_engine_side_imports_neither_the_api_nor_the_cli(forbidden: str) -> None:
    offenders = {module: sorted(name for name in imported if name.startswith(forbidden))
                 for module, imported in import_graph().items() if module.startswith(ENGINE_SIDE)}
    assert not {module: names for module, names in offenders.items() if names}


def test_the_engine_side_does_not_import_prometheus() -> None:
    for package in ENGINE_SIDE:
        for path in (REPO_ROOT / package.replace(".", "/")).rglob("*.py"):
            assert "prometheus_client" not in path.read_text(), path


def test_the_client_side_reaches_the_core_only_through_its_transports() -> None:
    """server/engine/client runs in the API process; it starts the engine core (transports.py) but calls nothing
    of it: whatever crosses the process boundary is a wire type of server/engine."""
    graph = import_graph()
    offenders = {module: sorted(name for name in imported if name.startswith("server.engine.core."))
                 for module, imported in graph.items()
                 if module.startswith("server.engine.client") and module != "server.engine.client.transports"}
    assert not {module: names for module, names in offenders.items() if names}
    wire = [module for module in graph if module.count(".") == 2 and module.startswith("server.engine.")]
    assert not {module: sorted(name for name in graph[module] if name.startswith(("server.engine.client.",
                                                                                    "server.engine.core.")))
                for module in wire if any(name.startswith(("server.engine.client.", "server.engine.core."))
                                          for name in graph[module])}


def test_the_shared_engine_modules_import_without_torch() -> None:
    shared = [module for module in import_graph() if module.count(".") == 2 and module.startswith("server.engine.")]
    code = (f"import sys; import {', '.join(shared)}, server.engine.client.output_streams; "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr or "importing the wire types imported torch"


def test_the_runner_reads_the_step_plan_not_the_scheduler() -> None:
    """The model runner (and so a tensor-parallel worker) knows the scheduler only through the data-only step plan
    (server/engine/step_plan.py): no scheduler, request or KV-cache-manager object reaches it."""
    offenders = {module: sorted(name for name in imported if name.startswith("server.engine.core."))
                 for module, imported in import_graph().items() if module.startswith("server.runner")}
    assert not {module: names for module, names in offenders.items() if names}
