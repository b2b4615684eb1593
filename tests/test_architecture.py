"""The import graph of the project's packages, read from the source (ast: every import, including
the lazy ones inside functions), so a layering rule broken anywhere fails here:

- no import cycle between modules;
- ``api`` and ``worker`` never import each other (what both need lives in ``trinity_service``);
- ``trinity_service`` imports neither ``api`` nor ``worker``;
- ``trinity_core`` imports no web/queue/database framework and no service package;
- no library module imports the test fixtures (``trinity_core.fixtures``).

A package's ``__init__`` is not counted as imported by its submodules (Python runs it first, but
that is not an edge the code chose).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "worker", "trinity_service", "cli", "trinity_core")
SERVICE_FRAMEWORKS = ("fastapi", "starlette", "celery", "kombu", "sqlmodel", "sqlalchemy", "uvicorn")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every module name an ``import`` / ``from ... import`` in the file names (absolute)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between project modules, every imported name per module)."""
    modules = project_modules()
    raw = {name: imports_of(name, path) for name, path in modules.items()}
    edges = {}
    for name, names in raw.items():
        targets = set()
        for imported in names:
            # `from a.b import c`: the module a.b.c if it exists, else a.b; `import a.b.c` the same
            if imported in modules:
                targets.add(imported)
            elif imported.rpartition(".")[0] in modules and imported.rpartition(".")[0] != name:
                targets.add(imported.rpartition(".")[0])
        edges[name] = targets - {name}
    return edges, raw


def top(name: str) -> str:
    return name.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root: str) -> None:
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                    if len(component) > 1:
                        out.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            strongconnect(name)
    return out


def test_the_walk_sees_lazy_imports():
    """The checker itself: an import inside a function is an edge (cli imports the core lazily)."""
    edges, _ = graph()
    assert "trinity_core.pipeline" in edges["cli.core"]
    assert len(edges) > 60


def test_no_import_cycles():
    edges, _ = graph()
    assert cycles(edges) == []


def test_api_and_worker_never_import_each_other():
    edges, _ = graph()
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if {top(a), top(b)} == {"api", "worker"} or (top(a) == "trinity_service" and top(b) in ("api", "worker", "cli"))]
    assert bad == []


def test_trinity_core_knows_nothing_of_the_service():
    _, raw = graph()
    forbidden = (*SERVICE_FRAMEWORKS, "api", "worker", "trinity_service", "cli")
    bad = [f"{name} imports {imported}" for name, names in raw.items() if top(name) == "trinity_core"
           for imported in names if top(imported) in forbidden]
    assert bad == []


def test_library_modules_do_not_import_the_fixtures():
    edges, _ = graph()
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if a.startswith("trinity_core.") and not a.startswith("trinity_core.fixtures")
           and b.startswith("trinity_core.fixtures")]
    assert bad == []
