"""Structure of the package read from its sources: onnxruntime sessions in one module, no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

# Source folder → the package it installs as (pyproject.toml's package-dir mapping).
PACKAGES = {"onnxflex": "onnxflex", "passes": "onnxflex.passes", "runtimes": "onnxflex.runtimes"}
SESSION_MODULE = "onnxflex.ort"
SESSION_NAMES = {"SessionOptions", "InferenceSession"}


def package_modules() -> dict[str, Path]:
    """Dotted module name → source file, for every .py file of the installed packages."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    return modules


def module_level(node: ast.AST):
    """The nodes run when the module is imported: into if/try/with/class blocks, not into function
    bodies (an import there runs on the call, once every module has loaded)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from module_level(child)


def imported(module: str, path: Path, stmt: ast.stmt, known: set[str]) -> list[str]:
    """The package modules ``stmt`` imports (``from pkg import sub`` names the submodule when there is one)."""
    if isinstance(stmt, ast.Import):
        return [alias.name for alias in stmt.names if alias.name in known]
    if not isinstance(stmt, ast.ImportFrom):
        return []
    base = stmt.module or ""
    if stmt.level:
        anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - stmt.level + 1]
        base = ".".join(anchor + ([stmt.module] if stmt.module else []))
    found = [f"{base}.{alias.name}" for alias in stmt.names if f"{base}.{alias.name}" in known]
    if base in known and len(found) < len(stmt.names):
        found.append(base)
    return found


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    """Module → the package modules it imports at module level (``in_functions``: inside functions too)."""
    modules = package_modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = ast.walk(tree) if in_functions else module_level(tree)
        graph[module] = {target for stmt in nodes for target in imported(module, path, stmt, known)
                         if target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "onnxflex.rounding.methods" in graph["onnxflex.rounding.reconstruct"], \
        f"the import graph missed modules or edges: {len(graph)} modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_through_functions():
    """A function-level import may not close a cycle either (a registration import is one)."""
    cycle = find_cycle(import_graph(in_functions=True))
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def session_uses(tree: ast.AST) -> list[str]:
    """Where ``tree`` imports onnxruntime or names SessionOptions/InferenceSession, as 'line: what'."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            uses += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "onnxruntime"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "onnxruntime":
            uses.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in SESSION_NAMES:
            uses.append(f"{node.lineno}: {node.attr}")
        elif isinstance(node, ast.Name) and node.id in SESSION_NAMES:
            uses.append(f"{node.lineno}: {node.id}")
    return uses


def test_onnxruntime_only_in_its_module():
    modules = package_modules()
    assert session_uses(ast.parse(modules[SESSION_MODULE].read_text())), \
        f"{SESSION_MODULE} no longer opens sessions; update SESSION_MODULE"
    outside = {module: uses for module, path in modules.items() if module != SESSION_MODULE
               and (uses := session_uses(ast.parse(path.read_text())))}
    assert not outside, f"onnxruntime used outside {SESSION_MODULE} (open sessions through it): {outside}"


def test_session_uses_sees_each_form():
    source = "import onnxruntime as rt\nfrom onnxruntime import SessionOptions\nrt.InferenceSession(b'')\n"
    assert [u.split(":")[0] for u in session_uses(ast.parse(source))] == ["1", "2", "3"]


MAX_FUNCTION_LINES = 60


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'name (N lines)' of every function or method in ``tree`` longer than ``limit`` lines (def to end)."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_over_60_lines():
    found = {module: long for module, path in package_modules().items()
             if (long := long_functions(ast.parse(path.read_text())))}
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them): {found}"


def test_long_functions_sees_one():
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_FUNCTION_LINES))
    assert long_functions(ast.parse(f"def f():\n{body}\n")) == [f"f ({MAX_FUNCTION_LINES + 1} lines)"]
    assert long_functions(ast.parse("def g():\n    pass\n")) == []
