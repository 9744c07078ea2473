"""The layers import one way down: cluster/ (the controller) may use learner/ and actors/, learner/ may use actors/,
and nothing imports what stands above it. Checked on the source with `ast`, so every import counts: at the top of
a module, inside a function, under `if TYPE_CHECKING:`. And no two modules import each other, directly or
through others. The folders install as `aha.actors`, `aha.learner` and `aha.cluster`, and every import uses
those names (a bare `cluster` or `learner` could be a user's own module)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("actors", "learner", "cluster")
"""Bottom to top: a module may import its own layer and the ones before it."""
OUTSIDE = ("bench", "tests", "scripts")
"""Packages of the repository that use the layers; no layer imports them."""

PENDING: set[tuple[str, str]] = set()
"""(importer, imported) pairs that break the layering and are allowed until the module is moved. Empty it."""


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (a package where a name is not a submodule)
    line: int

    def where(self) -> str:
        return (
            f"{self.importer.removeprefix('aha.').replace('.', '/')}.py:{self.line} imports {self.imported}"
        )


def module_name(path: Path) -> str:
    """The installed name: `aha.` + the path from the repository root (bench/, tests/: the bare path)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ("aha." if parts[0] in LAYERS else "") + ".".join(parts)


def layer_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in the module, wherever it stands; relative imports resolved, `from pkg import sub` taken
    as an import of the submodule."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(name, sub if sub in known else base, node.lineno))
    return found


def project_imports() -> list[Import]:
    modules = layer_modules()
    known = set(modules)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def rank(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] == "aha" and len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS) if parts[0] in OUTSIDE else None


def upward(imports: list[Import]) -> list[Import]:
    """Imports of a layer above the importer's (or of bench/, tests/, scripts/)."""
    return [imp for imp in imports if (rank(imp.imported) or 0) > (rank(imp.importer) or 0)]


def cycles(imports: list[Import]) -> list[list[str]]:
    """Each strongly connected set of two or more modules (or a module importing itself), as a cycle path."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if rank(imp.imported) is not None:  # the project's modules, not third-party ones
            graph.setdefault(imp.importer, set()).add(imp.imported)
            graph.setdefault(imp.imported, set())
    # Tarjan's algorithm, iterative (no recursion limit on long chains)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def test_the_import_graph_is_read():
    """The parse finds imports at the top, inside functions and under TYPE_CHECKING."""
    imports = project_imports()
    assert {imp.importer.split(".")[1] for imp in imports} == set(LAYERS)
    pairs = {(imp.importer, imp.imported) for imp in imports}
    assert ("aha.cluster.config", "aha.learner.config") in pairs  # top level
    assert ("aha.cluster.runtime", "aha.cluster.config") in pairs  # under TYPE_CHECKING
    assert ("aha.learner.ops", "aha.actors.runtime") in pairs  # inside a function


def test_layers_import_downward_only():
    bad = [imp for imp in upward(project_imports()) if (imp.importer, imp.imported) not in PENDING]
    lines = "\n".join(f"  {imp.where()}" for imp in bad)
    assert not bad, (
        f"imports against the layering (actors <- learner <- cluster; nothing imports bench/tests/scripts):\n"
        f"{lines}\nMove what is imported down to the lowest layer that uses it, or pass it in as an argument."
    )


def test_pending_exceptions_are_still_needed():
    still = {(imp.importer, imp.imported) for imp in upward(project_imports())}
    stale = sorted(PENDING - still)
    assert not stale, f"PENDING lists imports that no longer break the layering; remove them: {stale}"


def test_no_import_cycles():
    imports = project_imports()
    found = cycles(imports)
    detail = []
    for component in found:
        members = set(component)
        detail += [
            f"  {imp.where()}" for imp in imports if imp.importer in members and imp.imported in members
        ]
    assert not found, "modules that import each other (directly or through others):\n" + "\n".join(detail)


def test_the_checks_catch_an_upward_import_and_a_cycle():
    made_up = [
        Import("aha.actors.a", "aha.cluster.config", 3),
        Import("aha.learner.b", "aha.learner.c", 1),
        Import("aha.learner.c", "aha.learner.d", 1),
        Import("aha.learner.d", "aha.learner.b", 2),
        Import("aha.cluster.e", "aha.actors.a", 1),
    ]
    assert upward(made_up) == [made_up[0]]
    assert cycles(made_up) == [["aha.learner.b", "aha.learner.c", "aha.learner.d"]]


def test_every_import_of_the_layers_uses_the_aha_names():
    """Anywhere in the repository: `import cluster` would load a second copy of the module under another name
    (or a user's own `cluster.py`)."""
    paths = [p for top in (*LAYERS, *OUTSIDE) for p in sorted((ROOT / top).rglob("*.py"))]
    bare = [
        f"{path.relative_to(ROOT)}:{imp.line} imports {imp.imported}"
        for path in paths
        for imp in imports_of(module_name(path), path, set())
        if imp.imported.split(".")[0] in LAYERS
    ]
    assert not bare, "import the layers as aha.actors, aha.learner, aha.cluster:\n  " + "\n  ".join(bare)
