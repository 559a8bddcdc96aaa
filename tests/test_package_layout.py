"""The package's shape: no import cycles, the testbed kept out of the library, short modules.

The import graph is read from the source with `ast` (nothing is imported): every `import` and
`from ... import` anywhere in a module, lazy ones inside functions included, since a lazy import
is still a dependency. A package's `__init__` re-exporting its own modules is an edge like any
other; a submodule is not taken to import its parent package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500
# Modules allowed to import the testbed: the command that runs it (`dail world`) and the demo.
WORLD = "dail.world"
MAY_IMPORT_WORLD = ("dail.cli", "dail.stages.demo")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = SRC) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / "dail").rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports; `from a import b` names module a.b when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {module for module in found if module in known and module != name}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_library_does_not_import_the_world():
    reaching = sorted(
        f"{name} imports {', '.join(sorted(m for m in imports if in_package(m, WORLD)))}"
        for name, imports in import_graph().items()
        if not in_package(name, WORLD) and not any(in_package(name, allowed) for allowed in MAY_IMPORT_WORLD)
        and any(in_package(m, WORLD) for m in imports))
    assert reaching == []


def test_no_module_over_500_lines():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


# --------------------------------------------------------------------------- the checks themselves


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "dail" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("b_imports_a", [
    "from dail.a import x",
    "from dail import a",
    "def f():\n    from . import a\n",  # lazy and relative
    "import dail.a",
])
def test_a_cycle_is_found_however_it_is_written(tmp_path, b_imports_a):
    root = write_package(tmp_path, {"__init__.py": "", "a.py": "from dail.b import y\nx = 1\n",
                                    "b.py": b_imports_a + "\ny = 2\n", "c.py": "from dail import a, b\n"})
    assert cycles(import_graph(root)) == [["dail.a", "dail.b"]]


def test_a_package_reexporting_its_modules_is_no_cycle(tmp_path):
    root = write_package(tmp_path, {
        "__init__.py": "", "training/__init__.py": "from dail.training.trainer import T\n",
        "training/loss.py": "def f(): ...\n", "training/trainer.py": "from dail.training.loss import f\nT = f\n"})
    graph = import_graph(root)
    assert graph["dail.training"] == {"dail.training.trainer"}
    assert graph["dail.training.trainer"] == {"dail.training.loss"}
    assert cycles(graph) == []
