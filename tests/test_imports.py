"""The house rules of edgetrain/'s imports, checked from the source (ast), not by importing.

- No import circle between edgetrain's modules. A submodule importing its own package
  (`edgetrain.models.resnet` -> `edgetrain.models`, whose __init__ imports the submodules to
  fill the registry) is the registry pattern and is not counted as an edge.
- No `from edgetrain.x import _private` between files.
- A function-local import carries a comment saying why it is deferred (a heavy or optional
  dependency: torch in the CLI, onnx, matplotlib, scipy, scikit-learn, torch.distributed),
  except the optional packages that are deferred by nature (listed in `OPTIONAL`).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgetrain"
OPTIONAL = ("matplotlib", "scipy", "sklearn", "onnx", "onnxruntime", "onnxscript", "importlib",
            "tomllib", "tomli")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """(module imported, imported name or None, node) for every edgetrain import of a file."""
    tree = ast.parse(path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("edgetrain") and not n.level:
            for a in n.names:
                full = f"{n.module}.{a.name}"
                yield (full if full in mods else n.module), a.name, n
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("edgetrain"):
                    yield a.name, None, n


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = {m for m, _, _ in _imports(name, path, mods)}
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done, stack = [], set(), []

    def visit(u):
        if u in stack:
            cycles.append(stack[stack.index(u):] + [u])
            return
        if u in done:
            return
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            visit(v)
        stack.pop()
        done.add(u)

    for m in sorted(graph):
        visit(m)
    return cycles


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_edgetrain():
    graph = import_graph()
    assert "edgetrain.regimes.schedule" in graph  # the walk sees the package
    assert find_cycles(graph) == []


def test_no_private_name_imported_across_files():
    mods = _modules()
    bad = [f"{path.name}:{node.lineno} imports {imp} from {mod}"
           for name, path in mods.items() for mod, imp, node in _imports(name, path, mods)
           if imp and imp.startswith("_") and not imp.startswith("__")]
    assert bad == []


def test_function_local_imports_say_why_they_are_deferred():
    bad = []
    for path in PKG.rglob("*.py"):
        src = path.read_text()
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    mod = n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                    text = "\n".join(lines[n.lineno - 1:n.end_lineno])
                    if "#" not in text and (mod or "").split(".")[0] not in OPTIONAL:
                        bad.append(f"{path.relative_to(PKG)}:{n.lineno} {text.strip()}")
    assert bad == []
