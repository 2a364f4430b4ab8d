"""The build side and the runtime do not import each other, directly or through another module.

    build side: checkpoint, convert, engine_writer, cli          runtime: runtime/ (backends, tokenizer)
                    └──────────── both use: engine_dir, model_config, forward_batch, models/, layers/, kernels/
    loader.py (a checkpoint converted in memory, or an engine dir) is the one module above both; nothing here
    imports it.

Imports are read from the source (function-level ones too), so a lazy import cannot hide an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "engine_builder"
BUILD = {"engine_builder.checkpoint", "engine_builder.convert", "engine_builder.engine_writer", "engine_builder.cli",
         "engine_builder.quantized_checkpoint", "engine_builder.fp8_checkpoint_weights",
         "engine_builder.checkpoint_weights"}
LOADER = {"engine_builder.loader"}


def module_files() -> dict[str, Path]:
    """Every module of engine_builder, by dotted name (packages by their own name)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The engine_builder modules `name` imports anywhere in its source, with the packages around them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
    found.discard(name)
    return found


def import_closure() -> dict[str, set[str]]:
    """Module -> every engine_builder module importing it brings in (transitively)."""
    modules = module_files()
    direct = {name: imports_of(name, path, modules) for name, path in modules.items()}
    closure = {}
    for name in modules:
        seen, todo = set(), list(direct[name])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(direct[module])
        closure[name] = seen
    return closure


CLOSURE = import_closure()
RUNTIME = {name for name in CLOSURE if name == "engine_builder.runtime" or name.startswith("engine_builder.runtime.")}
SHARED = CLOSURE.keys() - BUILD - RUNTIME - LOADER - {"engine_builder"}


def test_the_scan_sees_the_modules_and_the_edges_it_checks():
    assert BUILD | LOADER <= CLOSURE.keys()
    assert {"engine_builder.runtime.backend", "engine_builder.runtime.torch_backend"} <= RUNTIME
    assert {"engine_builder.engine_dir", "engine_builder.models.registry", "engine_builder.forward_batch"} <= SHARED
    assert {"engine_builder.checkpoint", "engine_builder.runtime.torch_backend"} <= CLOSURE["engine_builder.loader"]
    assert "engine_builder.engine_writer" in CLOSURE["engine_builder.cli"]  # imported inside build()


def test_the_build_side_imports_no_runtime_module():
    for name in BUILD:
        assert not CLOSURE[name] & (RUNTIME | LOADER), (name, sorted(CLOSURE[name] & (RUNTIME | LOADER)))


def test_the_runtime_imports_no_build_module():
    for name in RUNTIME:
        assert not CLOSURE[name] & (BUILD | LOADER), (name, sorted(CLOSURE[name] & (BUILD | LOADER)))


def test_the_shared_modules_import_neither_side():
    for name in SHARED:
        wrong = CLOSURE[name] & (BUILD | RUNTIME | LOADER)
        assert not wrong, (name, sorted(wrong))
