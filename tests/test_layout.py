"""The rules of ARCHITECTURE.md that a reading of the imports can check: no import circle in the
packages (imports made only for type checking count too), the store's rooms stacked
(base < metering < engine < tables < apply < its public face), and the rest of the core using
the store through its public face only, and of each table module only the names in its
`__all__`."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import aggregator.store

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aggregator", "ingest", "meters")
STORE = "aggregator.store"
# Each room of the store, and the rooms it may import (besides itself).
ROOMS = {
    "base": set(),
    "metering": {"base"},
    "engine": {"base", "metering"},
    "tables": {"base", "metering", "engine"},
    "apply": {"base", "metering", "engine", "tables"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[tuple[str, str | None, str]]:
    """(module, name, the name bound) of every import in the file, wherever it stands
    (functions and `if TYPE_CHECKING:` blocks included); name None for `import module`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, alias.asname or alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                yield node.module, alias.name, alias.asname or alias.name


def _edges(module: str) -> set[str]:
    """The project's modules that `module` imports (a `from package import module` names the
    module, not the package)."""
    found = set()
    for imported, name, _ in _imports(MODULES[module]):
        if name is not None and f"{imported}.{name}" in MODULES:
            found.add(f"{imported}.{name}")
        elif imported in MODULES:
            found.add(imported)
    found.discard(module)
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle_type_only_ones_included() -> None:
    graph = {module: _edges(module) for module in MODULES}
    assert _circles(graph) == []


def _room(module: str) -> str | None:
    """The store room a module is in ('facade' for the public face and its listeners)."""
    if not module.startswith(STORE):
        return None
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[2] in ROOMS else "facade"


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_each_room_of_the_store_imports_only_the_rooms_below_it(room: str) -> None:
    broken = []
    for module in MODULES:
        if _room(module) != room:
            continue
        for imported in _edges(module):
            other = _room(imported)
            if other is not None and other != room and other not in ROOMS[room]:
                broken.append(f"{module} imports {imported}")
    assert broken == []


def test_the_rest_uses_the_stores_public_face_and_only_its_names() -> None:
    """Outside the store, imports name `aggregator.store` itself, each name is in its
    `__all__`, and a table module taken as a namespace is used only for its `__all__`."""
    public = set(aggregator.store.__all__)
    broken = []
    for module, path in MODULES.items():
        if module.startswith(STORE):
            continue
        tree = ast.parse(path.read_text())
        namespaces: dict[str, set[str]] = {}
        for imported, name, bound in _imports(path):
            if not imported.startswith(STORE):
                continue
            if imported != STORE or name not in public:
                broken.append(f"{module}: {imported} {name}")
                continue
            value = getattr(aggregator.store, name)
            if isinstance(value, ModuleType):
                namespaces[bound] = set(value.__all__)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in namespaces
                and node.attr not in namespaces[node.value.id]
            ):
                broken.append(f"{module}: {node.value.id}.{node.attr}")
    assert broken == []


def test_every_public_name_of_the_store_has_a_caller() -> None:
    """The public face exports what its callers use, nothing more."""
    used: set[str] = set()
    for module, path in MODULES.items():
        if not module.startswith(STORE):
            used |= {name for imported, name, _ in _imports(path) if imported == STORE and name}
    assert set(aggregator.store.__all__) - used == set()


def test_every_file_the_architecture_page_names_exists() -> None:
    """ARCHITECTURE.md names files by their path within a package (`store/tables/x.py`) or
    alone (`writer`): each `….py` it names is a file of the project."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("**/*.py") if ".venv" not in p.parts}
    named = set(re.findall(r"`([\w./-]+\.py)`", text))
    missing = [n for n in sorted(named) if not any(f == n or f.endswith("/" + n) for f in files)]
    assert missing == []
