"""The package's import graph: no cycle, and no private name imported from another module.

Every ``import`` counts, the strict way: those inside functions (lazy) and under
``if TYPE_CHECKING:`` too, since a cycle hidden by a late import is still two modules that
cannot be understood one without the other. ``from pkg import name`` where ``pkg.name`` is a
submodule is an edge to that submodule; any other ``from pkg import name`` is an edge to
``pkg`` itself (its ``__init__``), so a submodule importing its own package back is a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _base(name: str, path: Path, level: int, module: str | None) -> str:
    """The absolute module a ``from`` import names (``level`` dots of relative import)."""
    if level == 0:
        return module or ""
    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, *([module] if module else [])])


def imports(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, path, node.level, node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield submodule, None
                else:
                    yield base, alias.name


def graph(known: Mapping[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(edges between the ``known`` modules, private imports as "a imports _x from b")."""
    edges: dict[str, set[str]] = {name: set() for name in known}
    private = []
    for name, path in known.items():
        for target, imported in imports(name, path, known):
            if target not in known or target == name:
                continue
            edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name} imports {imported} from {target}")
    return edges, private


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative, so a deep graph cannot hit the recursion limit.
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found


def describe(component: list[str], edges: Mapping[str, set[str]]) -> str:
    members = set(component)
    return "\n".join(f"  {a} -> {', '.join(sorted(edges[a] & members))}" for a in component)


def test_distrain_has_no_import_cycle() -> None:
    known = modules(REPO, "distrain")
    edges, _ = graph(known)
    assert "distrain.group" in edges["distrain.ddp"]  # the graph sees the package's imports
    found = cycles(edges)
    assert not found, "import cycles in distrain:\n" + "\n\n".join(describe(c, edges) for c in found)


def test_distrain_imports_no_private_name_from_another_module() -> None:
    _, private = graph(modules(REPO, "distrain"))
    assert not private, "private names imported across modules:\n  " + "\n  ".join(private)


def test_the_check_sees_lazy_type_checking_and_package_cycles(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.sub import b\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\n"
    )
    (package / "c.py").write_text("def f():\n    from . import a\n    from .a import _hidden\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("import pkg\n")  # its own package's __init__ back
    edges, private = graph(modules(tmp_path, "pkg"))
    assert sorted(cycles(edges)) == [["pkg", "pkg.sub.b"], ["pkg.a", "pkg.c"]]
    assert private == ["pkg.c imports _hidden from pkg.a"]
