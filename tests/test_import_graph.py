"""The import graph of ``src/packvit``: no circle, no import from a subpackage back up to the
package root, and ``import packvit`` leaves the ``embed`` application unloaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
ROOT = "packvit"


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``src/packvit`` (a package is its ``__init__``)."""
    modules = {}
    for path in sorted((SOURCE / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but the bodies of ``if TYPE_CHECKING:`` blocks (imports for annotations
    only, never run)."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and (getattr(test, "id", None) or getattr(test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The packvit modules ``name`` imports, anywhere in the file (inside functions too): ``from P
    import x`` counts as an import of ``P.x`` where that is a module, else of ``P``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {module for module in found if module in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_relative_and_nested_imports():
    graph = _graph()
    assert "packvit.embed.run" in graph["packvit.embed"], "from .run import ... in embed/__init__.py"
    assert graph["packvit.embed.cli"] >= {"packvit.embed.run"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # cuda_graphs names the models' classes in annotations only (under TYPE_CHECKING), the models import it
    assert "packvit.models.base" not in graph["packvit.cuda_graphs"]
    assert "packvit.cuda_graphs" in graph["packvit.models.base"]


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_no_subpackage_module_imports_the_package_root():
    offenders = {name: sorted(targets) for name, targets in _graph().items()
                 if name.count(".") >= 2 or (name.count(".") == 1 and (SOURCE / Path(*name.split("."))).is_dir())
                 if ROOT in targets}
    assert offenders == {}


def test_import_packvit_does_not_load_the_embedding_application():
    code = ("import sys, packvit; loaded = sorted(m for m in sys.modules if m.startswith('packvit.embed')); "
            "import packvit.embed as embed_package; from packvit.embed import embed; "
            "print(loaded, type(embed_package).__name__, hasattr(embed_package, 'EmbedOptions'), callable(embed))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(SOURCE), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "module", "True", "True"]
