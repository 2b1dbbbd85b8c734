"""The package's layers, read from the source with ``ast``: imports only go down, and none forms a circle.

    adapters   the math and the modules            imports nothing else of dorakit
    formats    files on disk                       adapters
    analysis   the ΔM / ΔD diagnostic (a leaf)     adapters
    training   loop, data, checkpoints, ...        adapters, formats, analysis
    commands   the CLI                             anything

``dorakit/__init__.py`` (the public API) and ``__main__.py`` sit above them all; no module inside a
layer may import them. Function-level (lazy) imports count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ALLOWED = {
    "adapters": {"adapters"},
    "formats": {"adapters", "formats"},
    "analysis": {"adapters", "analysis"},
    "training": {"adapters", "formats", "analysis", "training"},
    "commands": {"adapters", "formats", "analysis", "training", "commands"},
}


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``src``."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> set[str]:
    """The modules of ``package`` that ``name`` (a file at ``path``) imports, at any depth in the file."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            targets = [mod] + [f"{mod}.{alias.name}" for alias in node.names if f"{mod}.{alias.name}" in modules]
        else:
            continue
        found |= {t for t in targets if t == package or t.startswith(package + ".")}
    return found


def layer(name: str) -> str:
    """adapters / formats / analysis / training / commands, or "root" for dorakit itself and __main__."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "root"


def violations(src: Path, package: str = "dorakit") -> list[str]:
    """Every import that goes up a layer, imports the root, or closes a circle; empty when the tree is sound."""
    modules = module_names(src, package)
    graph = {name: imports_of(name, path, modules, package) for name, path in modules.items()}
    found = []
    for name, targets in sorted(graph.items()):
        if layer(name) == "root":
            continue
        for target in sorted(targets):
            if layer(target) == "root":
                found.append(f"{name} imports the package root {target} (import from the layer instead)")
            elif layer(target) not in ALLOWED[layer(name)]:
                found.append(f"{name} ({layer(name)}) imports {target} ({layer(target)}): an import up a layer")
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in circles(graph)]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_only_go_down_and_form_no_circle() -> None:
    assert violations(SRC) == []


def test_every_layer_is_a_folder_and_nothing_else_sits_beside_them() -> None:
    top = {p.name for p in (SRC / "dorakit").iterdir() if p.name != "__pycache__"}
    assert top == {"__init__.py", "__main__.py", *ALLOWED}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "dorakit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"adapters/__init__.py": "", "adapters/a.py": "from ..formats import b\n",
      "formats/__init__.py": "", "formats/b.py": ""}, "an import up a layer"),
    ({"adapters/__init__.py": "", "adapters/a.py": "def f():\n    import dorakit.training.t\n",
      "training/__init__.py": "", "training/t.py": ""}, "an import up a layer"),
    ({"analysis/__init__.py": "", "analysis/a.py": "from ..formats.b import x\n",
      "formats/__init__.py": "", "formats/b.py": ""}, "an import up a layer"),
    ({"formats/__init__.py": "", "formats/a.py": "from .b import x\n", "formats/b.py": "def f():\n    from .a import y\n"},
     "import circle: dorakit.formats.a -> dorakit.formats.b -> dorakit.formats.a"),
    ({"__init__.py": "", "formats/__init__.py": "", "formats/a.py": "from dorakit import save_adapter\n"},
     "imports the package root"),
])
def test_the_check_finds_what_it_is_for(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    """Negative controls: an upward import (also a lazy one), a circle and a root import are each reported."""
    found = violations(_tree(tmp_path, files))
    assert any(expected in v for v in found), found


def test_a_sound_tree_passes(tmp_path: Path) -> None:
    files = {"__init__.py": "from .training import t\n", "adapters/__init__.py": "", "adapters/a.py": "",
             "formats/__init__.py": "", "formats/b.py": "from ..adapters import a\n",
             "training/__init__.py": "", "training/t.py": "from ..formats.b import x\nfrom ..adapters.a import y\n"}
    assert violations(_tree(tmp_path, files)) == []


@pytest.mark.parametrize("names", [["functional"], ["kernels"], None], ids=["functional", "kernels", "all"])
def test_every_public_name_imports_in_a_fresh_process(names: list[str] | None) -> None:
    """``from dorakit import X`` works for each name of ``dorakit.__all__`` as the first thing a program
    does (the lazy ``__getattr__`` must import a submodule it names, not find it already imported)."""
    import subprocess
    import sys

    code = ("import dorakit\nnames = {names!r} or dorakit.__all__\n"
            "missing = [n for n in names if getattr(dorakit, n, None) is None]\nassert not missing, missing\n")
    done = subprocess.run([sys.executable, "-c", code.format(names=names)], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
