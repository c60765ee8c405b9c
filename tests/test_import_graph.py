"""No import cycles among the modules of ``src/``: each layer (models, optimization, pipeline, ...) can be read,
tested and changed with only what it imports in view.  Every import counts, those inside functions too;
only imports under ``if TYPE_CHECKING:`` (annotations, never executed) are left out."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST):
    """Import statements outside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """{module: modules of ``files`` it imports}; ``files`` maps dotted module names (``__init__`` files as
    their package) to their source."""
    packages = {name for name in files if any(other.startswith(name + ".") for other in files)}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, source in files.items():
        package = module.split(".") if module in packages else module.split(".")[:-1]
        targets = set()
        for node in _runtime_imports(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = package[:len(package) - node.level + 1] if node.level else []
                origin = ".".join(base + ([node.module] if node.module else []))
                names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin
                         for alias in node.names]
            targets.update(t for t in map(known, names) if t and t != module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_in_src():
    files = {_module_name(path): path.read_text(encoding="utf-8") for path in (ROOT / "src").rglob("*.py")}
    assert len(files) > 80
    assert cycles(import_graph(files)) == []


def test_the_check_finds_cycles_through_lazy_and_relative_imports():
    files = {
        "src.models": "",
        "src.models.reader": "from .errors import Failure\ndef read():\n    from .codecs import decode\n",
        "src.models.codecs": "from .reader import read\n",
        "src.models.errors": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .reader import read\n",
        "src.pipeline": "",
        "src.pipeline.run": "from ..models import reader\n",
    }
    graph = import_graph(files)
    assert graph["src.models.errors"] == set()          # annotations only
    assert graph["src.pipeline.run"] == {"src.models.reader"}
    assert cycles(graph) == [["src.models.codecs", "src.models.reader"]]
