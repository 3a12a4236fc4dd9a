"""Data flows one way through the package: the ground floor (errors, configuration, delivery types) and the floors
(formats, privacy, warehouse) import nothing from what stands above them, and no module imports itself back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugins" / "health_ingest"
GROUND = ("health_ingest.errors", "health_ingest.config", "health_ingest.deliveries")
FLOORS = ("formats", "privacy", "warehouse")
ABOVE = ("sources", "batch", "airflow", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at any depth of the file (an import inside
    a function is a dependency too)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base for alias in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_floors_and_the_ground_import_nothing_from_above_them():
    graph = _imports()
    assert {"health_ingest.batch.lifecycle", "health_ingest.warehouse.merge", *GROUND} <= set(graph)
    upward = sorted(
        f"{module} imports {imported}"
        for module, imported_modules in graph.items()
        if _layer(module) in FLOORS or module in GROUND
        for imported in imported_modules
        if _layer(imported) in ABOVE
    )
    assert upward == []
    ground_up = sorted(
        f"{module} imports {imported}" for module in GROUND for imported in graph[module] if imported not in GROUND
    )
    assert ground_up == [], "the ground floor imports only itself"


def test_no_module_imports_itself_back():
    graph = _imports()
    circles = []
    state: dict[str, str] = {}  # "open" while its imports are being walked, then "done"

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                circles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                walk(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert circles == []
