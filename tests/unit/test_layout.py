"""The house's rules, read from the source: imports point one way (no circle between modules) and no
module imports or reaches for another module's private names.

Read statically (``ast``), so a lazy import inside a function counts like one at the top: a circle
that only closes at run time is still a circle a reader has to walk.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
    "where"]


def project_modules() -> dict[str, Path]:
    """Dotted name → file, for every module of the project's packages."""
    modules = {}
    for root in SOURCE_ROOTS:
        for path in (PROJECT_ROOT / root).glob("poolserve_*/**/*.py"):
            parts = path.relative_to(PROJECT_ROOT / root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = project_modules()


def imported_modules(module: str, tree: ast.AST) -> dict[str, set[str]]:
    """Project modules ``module`` imports → the names it takes from each (empty: the module itself)."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.setdefault(f"{base}.{alias.name}", set())
                elif base in MODULES:
                    found.setdefault(base, set()).add(alias.name)
    found.pop(module, None)
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    return {module: imported_modules(module, ast.parse(path.read_text())) for module, path in MODULES.items()}


def circles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(path: Path, module: str | None) -> list[str]:
    """``from m import _x`` and ``m._x`` where ``m`` is another project module, in one file."""
    tree = ast.parse(path.read_text())
    imported = imported_modules(module, tree) if module else _imports_of_outside_file(tree)
    found = [f"from {target} import {name}" for target, names in imported.items() for name in names if is_private(name)]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and is_private(node.attr) and aliases[node.value.id] != module):
            found.append(f"{aliases[node.value.id]}.{node.attr} (line {node.lineno})")
    return found


def _imports_of_outside_file(tree: ast.AST) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES and not node.level:
            for alias in node.names:
                if f"{node.module}.{alias.name}" not in MODULES:
                    found.setdefault(node.module, set()).add(alias.name)
    return found


def test_the_packages_are_read():
    assert {"poolserve_adapter.app", "poolserve_runtime.engine", "poolserve_stack.cli"} <= set(MODULES)


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_module_reaches_for_another_modules_private_names():
    offenders = {}
    for module, path in MODULES.items():
        if found := private_reaches(path, module):
            offenders[str(path.relative_to(PROJECT_ROOT))] = found
    for folder in ("tests", "benchmarks"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            if path.is_relative_to(PROJECT_ROOT / "benchmarks" / "poolserve_bench"):
                continue  # a package: checked above
            if found := private_reaches(path, None):
                offenders[str(path.relative_to(PROJECT_ROOT))] = found
    assert offenders == {}


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {"a": set()}}
    assert circles(graph) == [["a", "b", "c"]]
