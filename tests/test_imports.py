"""The package's import graph, read from source: no cycles, and the library never imports the app.

Imports inside functions count too: a function-level import that closes a cycle only hides it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qtg"


def module_name(path: Path, root: Path = ROOT) -> str:
    """``qtg/cli/__init__.py`` -> ``qtg.cli``; ``qtg/data/pipeline.py`` -> ``qtg.data.pipeline`` (from ``root``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, str | None]]:
    """Every import in a module's source, functions included, as ``(module, imported name or None)``.

    ``import a.b`` -> ``("a.b", None)``; ``from .x import y`` inside ``pkg.m`` -> ``("pkg.x", "y")``
    (``y`` may itself be a submodule: the caller decides). ``importlib.import_module("a.b")`` counts
    as ``import a.b``; with an f-string, ``import_module(f"a.{x}")``, as ``("a.", "*")``: any module
    under ``a.`` (the lazy loader of ``qtg.distributed`` is such a call).
    """
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, None))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                found.append((str(arg.values[0].value), "*"))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            found.extend((parent, alias.name) for alias in node.names)
    return found


def _is_import_module(func: ast.expr) -> bool:
    """``importlib.import_module``, ``import_module`` or ``__import__``."""
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` that it imports.

    An edge names the module the import is about: ``from qtg import plots`` -> ``qtg.plots``,
    ``from qtg.data.pipeline import Document`` -> ``qtg.data.pipeline``, ``import qtg.x.y`` -> ``qtg.x.y``. Parent
    packages that Python runs on the way are not edges (every import would then depend on
    ``qtg/__init__``).
    """
    root = package.parent
    sources = {module_name(p, root): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        edges = set()
        for module, attr in imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py"):
            if attr == "*":  # a computed name: every module it could be
                edges.update(m for m in sources if m.startswith(module) and m != name)
                continue
            target = f"{module}.{attr}" if attr and f"{module}.{attr}" in sources else module
            if target in sources and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan): the modules caught in cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, as ``[a, b, ..., a]``, per strongly connected component."""
    return [cycle_through(graph, comp) for comp in strongly_connected(graph)]


def cycle_through(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component, as ``[a, b, ..., a]``."""
    members = set(comp)
    start = comp[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first back to start: the shortest cycle through it
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"not a cycle: {comp}")


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "qtg.data.pipeline" in graph["qtg.training.train"]  # the graph is read at all
    found = [f"{' -> '.join(cycle_through(graph, c))} (modules in the cycle: {', '.join(c)})"
             for c in strongly_connected(graph)]
    assert not found, "import cycles in qtg/: " + "; ".join(found)


def test_library_never_imports_the_app():
    offenders = sorted(
        f"{name} imports {dotted}"
        for name, path in ((module_name(p), p) for p in PACKAGE.rglob("*.py"))
        if name != "qtg.cli.app"  # `qtg app` launches the app: the one sanctioned door
        for dotted, _ in imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py")
        if dotted.split(".")[0] in ("app", "gradio")
    )
    assert not offenders, offenders


@pytest.mark.parametrize(
    "files, cycle",
    [
        # a function-level import closes the cycle
        ({"a.py": "import pkg.b\n", "b.py": "def f():\n    from pkg import a\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
        # relative forms, through a subpackage's __init__
        (
            {"a.py": "from .sub import c\n", "sub/__init__.py": "", "sub/c.py": "from ..a import x\n"},
            ["pkg.a", "pkg.sub.c", "pkg.a"],
        ),
        # `import pkg.x.y` and a three-module loop
        (
            {"a.py": "import pkg.b\n", "b.py": "from pkg.c import z\n", "c.py": "def g():\n    from . import a\n"},
            ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ),
        # a lazy package __init__ (importlib with a computed name) hides the edge to its submodules
        (
            {
                "a.py": "from pkg import sub\n",
                "sub/__init__.py": "import importlib\ndef f(n):\n    return importlib.import_module(f'pkg.sub.{n}')\n",
                "sub/c.py": "import pkg.a\n",
            },
            ["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"],
        ),
    ],
)
def test_cycle_detector_sees_hidden_cycles(tmp_path, files, cycle):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert find_cycles(import_graph(pkg)) == [cycle]


def test_cycle_detector_passes_a_layered_package(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "b.py").write_text("from .a import x\n\ndef f():\n    import pkg.a\n")
    assert find_cycles(import_graph(pkg)) == []


def distribution(requirement: str) -> str:
    """``"fastapi>=0.110"`` -> ``fastapi``; names compared as pip does (case, ``_`` and ``.`` as ``-``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group()).lower()


def test_the_api_declares_what_it_imports():
    """The OpenAI-compatible API (qtg/serve, ``qtg serve``) imports fastapi, starlette, pydantic and uvicorn:
    the app extra that serves it declares each (they used to arrive only through gradio)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {distribution(r) for r in project["dependencies"] + project["optional-dependencies"]["app"]}
    providers = importlib.metadata.packages_distributions()
    missing = set()
    for path in [*sorted((PACKAGE / "serve").glob("*.py")), PACKAGE / "cli" / "serve.py"]:
        for module, _ in imported_names(ast.parse(path.read_text()), module_name(path), path.name == "__init__.py"):
            top = module.split(".")[0]
            if top != "qtg" and top not in sys.stdlib_module_names:
                if not {distribution(d) for d in providers.get(top, [top])} & declared:
                    missing.add(top)
    assert not missing, f"imported by the API, not declared by the app extra: {sorted(missing)}"


def test_the_layout_shows_the_layers():
    """Each module lives in a package that says what it holds; only what every layer shares stays at the top."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "atomic", "errors", "generate", "metrics"], top
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == ["cli", "data", "distributed", "experiments", "model", "plots", "serve", "topology", "training"]
