"""The import structure of fastattn: no import circle, and in fastattn.bench no private name taken
from another module. Checked statically (an AST walk of the sources, the checker itself tested on
small packages that break each rule) and by importing every fastattn.bench submodule first in
turn in an interpreter that has not imported fastattn.bench yet."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastattn"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(pkg: Path) -> dict[str, Path]:
    return {_module_name(p, pkg.parent): p for p in sorted(pkg.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module level, also inside if/try blocks,
    not in functions or classes, nor under ``if TYPE_CHECKING``."""
    out: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
            todo += [s for h in node.handlers for s in h.body]
    return out


def _absolute(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(pkg: Path) -> dict[str, set[str]]:
    """module -> the modules of ``pkg`` it imports when it is imported."""
    mods = _modules(pkg)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                src = _absolute(node, mod, is_pkg)
                targets = [
                    f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names
                ]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _declares_all(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    targets = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
    targets += [n.target for n in tree.body if isinstance(n, ast.AnnAssign)]
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


def private_uses(pkg: Path, scope: Path) -> list[str]:
    """``from <a module of pkg> import _name`` and ``<module of pkg>._name`` in the files under
    ``scope``, as ``file:line: what``. A module of the package whose name is private (internal to
    the package, e.g. ``fastattn._extension``) may be imported when it declares its surface in
    ``__all__``; a private name inside a module never."""
    top = pkg.name
    mods = _modules(pkg)
    found: list[str] = []
    for path in sorted(scope.rglob("*.py")):
        mod = _module_name(path, pkg.parent)
        tree = ast.parse(path.read_text(), str(path))
        bound: set[str] = set()  # local names bound to a module of pkg
        where = f"{path.relative_to(pkg.parent)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _absolute(node, mod, path.name == "__init__.py")
                if src != top and not src.startswith(top + "."):
                    continue
                for a in node.names:
                    path_of = mods.get(f"{src}.{a.name}")
                    if path_of is not None and _declares_all(path_of):
                        bound.add(a.asname or a.name)
                        continue
                    if _private(a.name):
                        found.append(f"{where}:{node.lineno}: from {src} import {a.name}")
                    bound.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        bound.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in bound:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_fastattn_has_no_import_circle() -> None:
    graph = import_graph(PACKAGE)
    assert "fastattn.bench.cases" in graph and graph["fastattn.bench.cases"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_bench_modules_take_no_private_name_from_another_module() -> None:
    assert private_uses(PACKAGE, PACKAGE / "bench") == []
    assert private_uses(PACKAGE, ROOT / "benchmarks") == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / "pkg" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_the_checks_catch_a_circle_and_a_private_import(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "import os\nif os.sep:\n    from pkg.sub.c import _helper\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import x\nfrom . import d\nfrom . import _ok, _bad\n_ok.f()\n",
        "sub/_ok.py": "__all__ = ['f']\ndef f(): pass\n",
        "sub/_bad.py": "def f(): pass\n",
        "sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                    "def f():\n    from pkg import a\n    return a._y\n",
    })  # fmt: skip
    graph = import_graph(pkg)
    assert (
        graph["pkg.sub.c"] == {"pkg.a", "pkg.sub.d", "pkg.sub._ok", "pkg.sub._bad"}
        and graph["pkg.sub.d"] == set()
    )
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert sorted(private_uses(pkg, pkg)) == [
        "pkg/b.py:3: from pkg.sub.c import _helper",
        "pkg/sub/c.py:3: from pkg.sub import _bad",
        "pkg/sub/d.py:6: a._y",
    ]
    (pkg / "a.py").write_text("x = 1\n")  # the circle broken
    assert find_cycle(import_graph(pkg)) is None


BENCH_MODULES = sorted(
    m for m in _modules(PACKAGE) if m.startswith("fastattn.bench.") and not m.endswith("__main__")
)

IMPORT_EACH_FIRST = """
import importlib, sys
import fastattn
mods = sys.argv[1:]
bad = []
for first in mods:
    for name in [m for m in sys.modules if m.split(".")[:2] == ["fastattn", "bench"]]:
        del sys.modules[name]
    if hasattr(fastattn, "bench"):
        delattr(fastattn, "bench")
    try:
        for m in [first, *mods]:
            importlib.import_module(m)
    except Exception as e:
        bad.append(f"{first} first: {type(e).__name__}: {e}")
    from fastattn.bench import cases
    if set(cases.REGISTRY) != {"softmax", "layernorm", "rmsnorm", "add-layernorm", "add-rmsnorm",
                               "attention", "model", "varlen", "paged"}:
        bad.append(f"{first} first: registry {list(cases.REGISTRY)}")
print("\\n".join(bad) or "ok")
"""


def test_every_bench_module_imports_first() -> None:
    """Each fastattn.bench submodule imported before any other of them (the package's __init__
    imports none), then all the others: every one imports, and the registry gets every op."""
    assert {"fastattn.bench.cli", "fastattn.bench.framework", "fastattn.bench.cases"} <= set(
        BENCH_MODULES
    )
    res = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, *BENCH_MODULES],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok", res.stdout


def test_registry_order_is_kept() -> None:
    """cases.py imports the builder modules in registry order (the default suite runs in it)."""
    from fastattn.bench import cases as C

    order = [
        "softmax",
        "layernorm",
        "rmsnorm",
        "add-layernorm",
        "add-rmsnorm",
        "attention",
        "model",
        "varlen",
        "paged",
    ]
    assert list(C.REGISTRY) == order
    assert C.DEFAULT_OPS == order[:5]
