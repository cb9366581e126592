"""Which part of mecqtk imports which: the package's layering, checked.

A part is a subpackage (``mecqtk/graph``) or a top-level module (``mecqtk/run.py``). The tool
reads every module's imports from its source (no import is executed), prints for each part the
parts it imports, and exits with status 1 when the parts import each other in a cycle or when a
function-level import outside ``mecqtk/cli`` could be hiding one. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count.

Usage (from the repository root):
    python tools/import_graph.py           # the table and the verdict
    python tools/import_graph.py --dot     # Graphviz source of the same graph
    python tools/import_graph.py --package /tmp/old-checkout/mecqtk
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mecqtk"
# The command line imports each command's stage inside the command (a command loads only its own
# stage); below it, an import inside a function is how a cycle hides.
LAZY_IMPORTS_ALLOWED = ("cli",)


@dataclass
class ImportGraph:
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    function_level: list[str] = field(default_factory=list)  # "module:line -> imported"


def part_of(module: str) -> str | None:
    """The part a dotted ``mecqtk...`` module name belongs to (None outside mecqtk)."""
    pieces = module.split(".")
    if pieces[0] != "mecqtk":
        return None
    return pieces[1] if len(pieces) > 1 else "mecqtk"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".")[: -node.level]
        return [".".join(base + ([node.module] if node.module else []))]
    return [node.module or ""]


def _walk(tree: ast.AST, module: str, graph: ImportGraph, path: str, nested: bool) -> None:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _imported_modules(node, module):
                source, dest = part_of(module), part_of(target)
                if dest is None or dest == source:
                    continue
                graph.edges[source].add(dest)
                if nested and source not in LAZY_IMPORTS_ALLOWED:
                    graph.function_level.append(f"{path}:{node.lineno} imports {target}")
        inner = nested or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        _walk(node, module, graph, path, inner)


def build_graph(package_dir: Path = PACKAGE_DIR) -> ImportGraph:
    graph = ImportGraph()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        _walk(ast.parse(path.read_text(), str(path)), module, graph,
              relative.with_suffix(".py").as_posix(), nested=False)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the part graph (``[a, b, ..., a]``), or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """Parts grouped by height: each imports only parts in earlier groups (the graph is acyclic)."""
    parts = set(edges) | {d for ds in edges.values() for d in ds}
    height: dict[str, int] = {}

    def h(part: str) -> int:
        if part not in height:
            height[part] = 1 + max((h(d) for d in edges.get(part, ())), default=-1)
        return height[part]

    grouped: dict[int, list[str]] = defaultdict(list)
    for part in parts:
        grouped[h(part)].append(part)
    return [sorted(grouped[k]) for k in sorted(grouped)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz source instead")
    parser.add_argument("--package", type=Path, default=PACKAGE_DIR,
                        help="the mecqtk folder to read (default: this checkout's)")
    args = parser.parse_args()
    graph = build_graph(args.package)
    if args.dot:
        print("digraph mecqtk {")
        for source in sorted(graph.edges):
            for dest in sorted(graph.edges[source]):
                print(f'  "{source}" -> "{dest}";')
        print("}")
        return 0
    cycle = find_cycle(graph.edges)
    if cycle is None:
        print("layers, lowest first (each part imports only parts in lower layers):")
        for level, parts in enumerate(layers(graph.edges)):
            print(f"  {level}: {', '.join(parts)}")
    print("\npart -> parts it imports")
    for source in sorted(graph.edges):
        print(f"  {source:<11} -> {', '.join(sorted(graph.edges[source]))}")
    failed = False
    if cycle:
        print(f"\ncycle: {' -> '.join(cycle)}")
        failed = True
    for line in graph.function_level:
        print(f"function-level import outside {'/'.join(LAZY_IMPORTS_ALLOWED)}: {line}")
        failed = True
    print("\nverdict:", "FAILED" if failed else "no cycle, no hidden import")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
