"""Imports go one way: no cycle inside a package (a file in a circle cannot be read or changed alone), and no
layer reaches up (models → export → runtime; benchmarks may use all three, runtime uses none of them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "export", "runtime", "benchmarks")
# What each package may import of the others (runtime goes on boards: numpy, Pillow and an engine only).
ALLOWED = {"models": {"runtime"}, "export": {"models", "runtime"}, "runtime": set(),
           "benchmarks": {"models", "export", "runtime"}}


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: modules of PACKAGES it imports}, module-level and function-level imports alike."""
    files = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    edges = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                # a package's __init__ importing its own modules, and a module importing its package, are not edges
                if name and name != module and not module.startswith(name + ".") and not (
                        path.name == "__init__.py" and name.startswith(module + ".")):
                    edges[module].add(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_the_packages():
    assert cycles(module_graph()) == []


def test_no_layer_imports_a_layer_above_it():
    wrong = sorted(f"{m} imports {t}" for m, targets in module_graph().items() for t in targets
                   if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert wrong == []


@pytest.mark.parametrize("code, expected", [
    ({"a": "from . import b", "b": "from .c import x", "c": "def f():\n    from .a import y"}, [["p.a", "p.b", "p.c"]]),
    ({"a": "from . import b", "b": "import os"}, []),
])
def test_the_cycle_check_finds_a_planted_circle(tmp_path, code, expected, monkeypatch):
    package = tmp_path / "p"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in code.items():
        (package / f"{name}.py").write_text(text + "\n")
    monkeypatch.setattr(f"{__name__}.PACKAGES", ("p",))
    assert cycles(module_graph(tmp_path)) == expected
