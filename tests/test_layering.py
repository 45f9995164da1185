"""The package's import layering is true: no import cycle and no import of a higher layer, counting module-level,
function-level and ``TYPE_CHECKING`` imports, and a package's ``__init__`` runs whenever one of its modules is
imported. The declared order is the one docs/architecture.md shows.

The checker is plain code over the source (``ast``), so it is also run on planted packages to show it fails.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "turnover_hf"

# Lowest first. A module may import its own layer or lower ones; a package (e.g. "estimators") stands for all of
# its modules. Modules named here that do not exist yet are harmless; a module not named here fails the test.
LAYERS: list[tuple[str, ...]] = [
    ("version", "errors", "files", "fingerprints", "ranks", "validation", "masks", "assets", "store"),
    ("config",),
    ("context",),                     # the MaskState: mask state only
    ("sites", "layers"),              # which modules carry masks; the masked forward
    ("losses", "data", "training_set"),
    ("patcher", "prefix"),            # prefix: the replay of everything below the first masked module
    ("trainer", "callbacks", "dynamics"),
    ("estimators",),                  # the registry and one folder or file per estimator
    ("checkpoint",),                  # influence-ready folders; asks the registry which state folders to carry
    ("targets", "duplicates", "pipeline_inputs", "pipeline", "label_issues", "evaluation", "audit"),
    ("plots", "report"),
    ("cli", "demo", "demo_report", "__main__"),
]

# Function-level imports of the package's own modules: none. (Optional third-party dependencies may be imported
# in a function; this test looks at the package's own imports only.)
DEFERRED_ALLOWED: dict[tuple[str, str], str] = {}


@dataclass
class ImportGraph:
    modules: dict[str, pathlib.Path]
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    kinds: dict[tuple[str, str], str] = field(default_factory=dict)  # "module", "function" or "typing"


def _module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: pathlib.Path, node: ast.AST, modules: dict[str, pathlib.Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    return [f"{name}.{a.name}" if f"{name}.{a.name}" in modules else name for a in node.names]


def import_graph(root: pathlib.Path) -> ImportGraph:
    """Every import between the modules of the package at ``root``, with where it sits."""
    graph = ImportGraph(_module_names(root))
    top = root.name

    def visit(module: str, path: pathlib.Path, node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                here = "function"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                here = "typing"
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, path, child, graph.modules):
                    if target.split(".")[0] != top:
                        continue
                    # importing a.b.c runs the __init__ of a.b too (not the top package's: every import runs it)
                    parts = target.split(".")
                    runs = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
                    for each in runs:
                        if each in graph.modules and each != module and not module.startswith(each + "."):
                            graph.edges[module].add(each)
                            graph.kinds.setdefault((module, each), here)
            visit(module, path, child, here)

    for module, path in graph.modules.items():
        visit(module, path, ast.parse(path.read_text(encoding="utf-8")), "module")
    return graph


def cycles(graph: ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.edges.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph.modules):
        if v not in index:
            connect(v)
    return found


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return len(layers)  # the top package's __init__ re-exports everything: above all layers
    for rank, names in enumerate(layers):
        if parts[1] in names:
            return rank
    return None


def layering_problems(root: pathlib.Path, layers: list[tuple[str, ...]],
                      deferred_allowed: dict[tuple[str, str], str]) -> list[str]:
    """Every violation in the package at ``root``: cycles, upward imports, undeclared modules, deferred imports."""
    graph = import_graph(root)
    problems = []
    for component in cycles(graph):
        links = [f"{a} -> {b} ({graph.kinds[(a, b)]})" for a in component for b in sorted(graph.edges[a])
                 if b in component]
        problems.append(f"import cycle among {component}: " + "; ".join(links))
    for module in sorted(graph.modules):
        if layer_of(module, layers) is None:
            problems.append(f"{module} is in no declared layer; add it to LAYERS (and to docs/architecture.md)")
    for (a, b), kind in sorted(graph.kinds.items()):
        rank_a, rank_b = layer_of(a, layers), layer_of(b, layers)
        if rank_a is not None and rank_b is not None and rank_b > rank_a:
            problems.append(f"{a} (layer {rank_a}) imports the higher {b} (layer {rank_b}) [{kind}]")
        if kind == "function" and (a, b) not in deferred_allowed:
            problems.append(f"{a} imports {b} inside a function; import it at module level")
    return problems


def test_the_package_has_no_cycle_no_upward_import_and_no_deferred_import():
    problems = layering_problems(PACKAGE, LAYERS, DEFERRED_ALLOWED)
    assert not problems, "\n".join(problems)


def test_every_declared_module_exists_or_is_reserved():
    """The declaration names real modules (a typo would make a layer silently empty)."""
    present = {name.split(".")[1] for name in _module_names(PACKAGE) if "." in name}
    reserved = {"audit", "duplicates", "targets"}  # new modules planned for this layer order
    missing = sorted({n for names in LAYERS for n in names} - present - reserved)
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def _plant(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


PLANTED_LAYERS = [("low",), ("mid",), ("high",)]


@pytest.mark.parametrize("kind, files, expected", [
    ("cycle through TYPE_CHECKING", {
        "__init__.py": "",
        "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .mid import M\n",
        "mid.py": "from .low import L\n",
        "high.py": "",
    }, "import cycle among ['pkg.low', 'pkg.mid']"),
    ("upward import at module level", {
        "__init__.py": "", "low.py": "from . import high\n", "mid.py": "", "high.py": "",
    }, "pkg.low (layer 0) imports the higher pkg.high (layer 2) [module]"),
    ("cycle through a package __init__", {
        "__init__.py": "",
        "low.py": "",
        "mid/__init__.py": "from . import part\n",
        "mid/part.py": "from ..high import H\n",
        "high.py": "from .mid.other import O\n",
        "mid/other.py": "",
    }, "import cycle among ['pkg.high', 'pkg.mid', 'pkg.mid.part']"),
    ("deferred import", {
        "__init__.py": "", "low.py": "", "mid.py": "def f():\n    from .low import x\n", "high.py": "",
    }, "pkg.mid imports pkg.low inside a function"),
    ("undeclared module", {
        "__init__.py": "", "low.py": "", "mid.py": "", "high.py": "", "stray.py": "",
    }, "pkg.stray is in no declared layer"),
])
def test_the_checker_fails_on_a_planted_violation(tmp_path, kind, files, expected):
    root = _plant(tmp_path, files)
    problems = layering_problems(root, PLANTED_LAYERS, {})
    assert any(expected in p for p in problems), (kind, problems)


def test_the_checker_passes_a_clean_planted_package(tmp_path):
    root = _plant(tmp_path, {
        "__init__.py": "from .high import H\n",
        "low.py": "L = 1\n",
        "mid.py": "from typing import TYPE_CHECKING\nfrom .low import L\nif TYPE_CHECKING:\n    from .low import L\n",
        "high.py": "from .mid import L as H\nimport json\ndef f():\n    import numpy\n",
    })
    assert layering_problems(root, PLANTED_LAYERS, {}) == []
