"""The layout contract (docs/layout.md, "Where each concept lives"), checked on the source itself.

* ``bnref`` imports neither onnx nor onnx_tools nor demo; ``onnx_tools`` builds on ``bnref``.
* No import cycle among the project's modules (module-level and function-level imports alike;
  only ``if TYPE_CHECKING:`` blocks are exempt).
* No private name (``_x``) is imported from, or read off, another module, and no private
  module of one top-level package is imported by another package.
* No file of the packages is longer than ``MAX_LINES`` and no function longer than
  ``MAX_FUNCTION_LINES`` (docstring included): each has one job.

Each check parses the files with :mod:`ast`; nothing is imported, so a failing check names
the file and line instead of failing at import time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bnref", "onnx_tools", "demo")
MAX_LINES = 360
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


FILES = _files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for c in child.orelse for n in [c, *_walk(c)])
            continue
        yield child
        yield from _walk(child)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_module(name: str) -> str | None:
    """The longest project module that ``name`` refers to (``a.b.c`` -> ``a.b`` if only it exists)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in FILES:
            return candidate
    return None


class _Imports:
    """What one module imports: project modules (for the graph) and the names it takes."""

    def __init__(self, module: str, path: Path) -> None:
        self.module = module
        self.path = path
        self.tree = ast.parse(path.read_text(), str(path))
        self.is_package = path.name == "__init__.py"
        self.edges: dict[str, int] = {}  # imported project module -> first line
        self.external: dict[str, int] = {}  # top-level external package -> first line
        self.private: list[str] = []
        aliases: dict[str, str] = {}  # local name -> project module it is bound to
        for node in _walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._edge(alias.name, node.lineno)
                    target = _project_module(alias.name)
                    if target and alias.asname:
                        aliases[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, self.is_package, node)
                if source == "__future__":
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if _project_module(full) == full:  # `from pkg import submodule`
                        self._edge(full, node.lineno)
                        aliases[alias.asname or alias.name] = full
                    else:
                        self._edge(source, node.lineno)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and _project_module(source) not in (None, module):
                            self.private.append(f"line {node.lineno}: from {source} import {alias.name}")
        for node in _walk(self.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases[node.value.id] != module
            ):
                self.private.append(f"line {node.lineno}: {node.value.id}.{node.attr}")

    def _edge(self, name: str, line: int) -> None:
        target = _project_module(name)
        if target is None:
            self.external.setdefault(name.split(".")[0], line)
        elif target != self.module:
            self.edges.setdefault(target, line)


IMPORTS = {m: _Imports(m, p) for m, p in FILES.items()}


def _package_of(module: str) -> str:
    return module.split(".")[0]


def _is_private_module(module: str) -> bool:
    return any(part.startswith("_") and part != "__main__" for part in module.split("."))


def test_bnref_depends_on_nothing_but_numpy():
    bad = [
        f"{m} line {line}: imports {name}"
        for m, imp in IMPORTS.items()
        if _package_of(m) == "bnref"
        for name, line in [*imp.external.items(), *imp.edges.items()]
        if name.split(".")[0] in ("onnx", "onnxruntime", "onnx_tools", "demo", "torch", "jax")
    ]
    assert not bad, "\n".join(bad)


def test_onnx_tools_never_imports_demo():
    bad = [f"{m} imports {e}" for m, imp in IMPORTS.items() if m.startswith("onnx_tools")
           for e in imp.edges if e.startswith("demo")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: set(imp.edges) for m, imp in IMPORTS.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them: the edge
    # submodule -> parent package exists only because Python runs the parent first.
    for m in graph:
        graph[m] = {e for e in graph[m] if not m.startswith(e + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for e in sorted(graph[m]):
            if state.get(e) == 1:
                cycles.append(" -> ".join([*stack[stack.index(e):], e]))
            elif e not in state:
                visit(e)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    bad = [f"{imp.path.relative_to(ROOT)} {p}" for imp in IMPORTS.values() for p in imp.private]
    assert not bad, "\n".join(bad)


def test_no_private_module_crosses_a_package():
    bad = [
        f"{imp.path.relative_to(ROOT)} line {line}: imports {e}"
        for m, imp in IMPORTS.items()
        for e, line in imp.edges.items()
        if _is_private_module(e) and _package_of(e) != _package_of(m)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(FILES))
def test_file_has_one_job(module):
    lines = len(FILES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{FILES[module].relative_to(ROOT)} has {lines} lines (> {MAX_LINES})"


@pytest.mark.parametrize("module", sorted(FILES))
def test_functions_are_short(module):
    long = [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(IMPORTS[module].tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{FILES[module].relative_to(ROOT)}: " + "; ".join(long)


def test_the_checks_can_fail(tmp_path):
    """The parser sees a private import, an attribute read and a TYPE_CHECKING exemption."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "from onnx_tools.graph import _private\n"
        "import onnx_tools.graph as g\n"
        "g._other\n"
        "if TYPE_CHECKING:\n"
        "    from onnx_tools.graph import _typed\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(src)
    imp = _Imports("onnx_tools.probe_module", path)
    assert imp.private == ["line 2: from onnx_tools.graph import _private", "line 4: g._other"]
    assert "onnx_tools.graph" in imp.edges
