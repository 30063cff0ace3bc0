"""The layering contract of ``docs/architecture.md`` section 1, checked on the source.

Every import of one of our modules by another (module level or inside a function,
``TYPE_CHECKING`` blocks included) must go to the same unit or to a unit of a lower
layer, so there are no cycles between units and no upward imports. Inside the
package, the imports that run at import time must not form a cycle between modules.
A new top-level module or subpackage fails here until it is given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lower number = lower layer. A unit may import its own layer's units only where
# noted in ALLOWED_SAME_LAYER; otherwise strictly lower layers.
LAYERS = {
    "_lazy": 0, "_version": 0, "config": 0, "jsonfile": 0, "tasks": 0,
    "attention": 1, "safety": 1, "control": 1,
    "models": 2,
    "quality": 3,
    "generation": 4,
    "autotune": 5,
    "evaluation": 6,
    "human": 7,
    "cli": 8,
    "<root>": 9,            # the package root re-exports lazily (by name, no import)
}


def _module_name(path: Path, root: Path = SRC) -> tuple[str, str]:
    """(module, package it resolves relative imports against)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports(path: Path, root: Path = SRC):
    """Yield ``(target module, at import time?)`` for every import of ``creative_sparse``."""
    module, package = _module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top_level = {id(n) for n in tree.body}
    # Imports inside `if TYPE_CHECKING:` or try/except at module level still run
    # (or are type-only); treat direct children of the module body and of its
    # if/try blocks as import time, everything inside a def/class as deferred.
    for stmt in tree.body:
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(stmt)
                             if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("creative_sparse"):
                continue
            # `from a import b`: b may be a submodule (then a.b is loaded) or a name
            # of a (then `_resolve` reduces a.b to a).
            for alias in node.names:
                yield f"{target}.{alias.name}", id(node) in top_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("creative_sparse"):
                    yield alias.name, id(node) in top_level


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _sources() -> list[Path]:
    return sorted((SRC / "creative_sparse").rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)[0]) for p in _sources()}
    missing = sorted(units - set(LAYERS))
    assert not missing, (f"give these units a layer in tests/test_layering.py and "
                         f"docs/architecture.md section 1: {missing}")


def test_no_upward_imports():
    upward = []
    for path in _sources():
        source = _unit(_module_name(path)[0])
        for target, _ in _imports(path):
            dest = _unit(target)
            if dest != source and LAYERS.get(dest, 99) >= LAYERS.get(source, 99):
                upward.append(f"{path.relative_to(SRC)}: {source} (layer {LAYERS.get(source)}) "
                              f"imports {target} (layer {LAYERS.get(dest)})")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def _resolve(target: str, modules: set[str]) -> str | None:
    """The module an import loads: ``a.b.name`` -> ``a.b`` when ``name`` is not a module."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def test_no_import_time_cycles():
    paths = {_module_name(p)[0]: p for p in _sources()}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        for target, at_import in _imports(path):
            dest = _resolve(target, set(paths))
            if at_import and dest and dest != module:
                graph[module].add(dest)
    # Importing a submodule imports its parent packages first.
    for module in paths:
        parent = module.rpartition(".")[0]
        if parent in graph and parent != module:
            graph[module].add(parent)

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            # A package importing its own submodule is not a cycle: the parent's
            # import of the child runs while the parent is partially initialised.
            if n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import-time cycle: " + " -> ".join(cycle))


def test_the_check_sees_an_upward_import(tmp_path):
    """The contract check is not vacuous: a planted upward import is found and ranked."""
    pkg = tmp_path / "creative_sparse"
    (pkg / "attention").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "attention" / "__init__.py").write_text(
        "from ..generation import x\n\ndef f():\n    from .. import quality\n")
    found = list(_imports(pkg / "attention" / "__init__.py", tmp_path))
    assert found == [("creative_sparse.generation.x", True), ("creative_sparse.quality", False)]
    assert all(LAYERS[_unit(t)] > LAYERS["attention"] for t, _ in found)
