"""The vaulttmpfs package's import graph, read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "vaulttmpfs"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
TESTS = Path(__file__).resolve().parent


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """{dotted module name: source} for every .py file of the package."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, at any depth of the file (functions included);
    `from pkg import name` counts as importing pkg.name when that is a module."""
    sources = module_sources() if sources is None else sources
    packages = {name for name in sources if any(other.startswith(name + ".") for other in sources)}
    graph: dict[str, set[str]] = {}
    for module, text in sources.items():
        here = module if module in packages else module.rpartition(".")[0]  # what `.` means in this file
        targets: set[str] = set()
        for node in ast.walk(ast.parse(text, filename=module)):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in sources else base)
        graph[module] = {t for t in targets if t in sources and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph.get(module, ())):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done and (found := visit(target)):
                return found
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (found := visit(module)):
            return found
    return None
