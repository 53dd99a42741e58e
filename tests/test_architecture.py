"""The layering rule, read from the source with ``ast`` (nothing of the package is imported).

Imports go downward only (cli -> training -> runs/tools -> diffusion/data -> core -> backends), there are
no cycles, and core is tensors in and out. ``check_package(root)`` takes the path of a
package folder and returns one line per violation; the tests run it on the real package and
on small planted packages that prove each rule can fail. ARCHITECTURE.md explains the layers.

What counts as an import of a package module: ``import p.a.b``, ``from p.a import b`` (``b``
a submodule or a name), ``from . import b``, ``from .a import b``, at module level or inside
functions, and the string names in ``importlib.import_module("p.a")`` / ``__import__("p.a")``
calls and in dict values such as ``_LAZY = {"name": "p.a.b"}``.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Import", "collect_imports", "layer_of", "check_layers", "check_cycles",
           "check_third_party", "check_package"]

ROOT = Path(__file__).resolve().parents[1] / "pccfast"

# subpackage -> rank; a module imports its own subpackage and strictly lower ranks only
RANKS = {
    "backends": 1,   # C-kernel loader, ctypes wrappers, RAPIDS
    "core": 2,       # the labeller: tensors in, tensors out; config, label-set vocabulary, checks
    "diffusion": 3,  # attention processors, capture, text tokens, pipeline loading, tiny model
    "data": 3,       # the on-disk edge: dataset layout, manifest, captures, prompts, label-set files
    "runs": 4,       # batching, resume, progress, failures, reports; local loop and Ray
    "tools": 4,      # inspect, evaluate: read datasets and score them
    "training": 5,   # train a segmenter on a dataset: reads datasets, scores with tools, progress from runs
    "cli": 6,        # argparse, one module per command
}
# same rank, and still kept apart
SIBLINGS = {frozenset({"diffusion", "data"}), frozenset({"runs", "tools"})}
# thin ``python -m <package>.<name>`` modules; each imports only ``<package>.cli.<name>``
ENTRY_MODULES = {"generate", "relabel", "merge", "prompts", "inspect", "evaluate", "native", "export", "train"}
API_MAY_IMPORT = 4      # the package's __init__ (lazy public API): anything below cli
TESTING_MAY_IMPORT = 4  # testing (scenes, reference, fixtures): anything below cli; nobody imports it
# modules of the installed package whose files live outside the package folder
# (pyproject maps the top-level kernels/ folder, the C sources, to <package>.kernels)
OUTSIDE_MODULES = {"kernels": "backends"}

# third-party modules core never imports: it takes tensors and returns tensors
CORE_FORBIDDEN = ("diffusers", "transformers", "PIL", "safetensors", "ray", "tqdm", "argparse")
ARGPARSE_LAYERS = {"cli", "testing"}

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Import:
    """One import statement (or string module name) found in a module."""

    path: str        # file of the importing module, relative to the package's parent, posix
    line: int        # line of the statement
    source: str      # importing module, dotted
    target: str      # imported module, dotted and absolute (a package module or a third-party one)
    load_time: bool  # runs when the importing module is loaded (module level, not TYPE_CHECKING)


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (a package folder)."""
    root = Path(root)
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if "__pycache__" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


class _Collector(ast.NodeVisitor):
    """Records the imports of one module, remembering whether each runs at load time."""

    def __init__(self, module: str, is_package: bool, path: str, pkg: str, modules: set[str]):
        self.module, self.path, self.pkg, self.modules = module, path, pkg, modules
        # the package that relative imports start from
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[Import] = []
        self.errors: list[str] = []
        self._deferred = 0  # > 0 inside a function, lambda or ``if TYPE_CHECKING:``

    def _add(self, node: ast.AST, target: str, load_time: bool | None = None) -> None:
        lt = self._deferred == 0 if load_time is None else load_time
        imp = Import(self.path, node.lineno, self.module, target, lt)
        if imp not in self.found:  # ``from p.a import x, y`` is one import of p.a
            self.found.append(imp)

    def _resolve_relative(self, node: ast.ImportFrom) -> str | None:
        base = self.package.split(".")
        if node.level - 1 >= len(base):
            self.errors.append(f"{self.path}:{node.lineno} has a relative import above the package")
            return None
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    # scopes whose body does not run at import time
    def _visit_deferred(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_deferred

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._deferred += 1
        for stmt in node.body:
            self.visit(stmt)
        self._deferred -= 1
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve_relative(node) if node.level else node.module
        if base is None:
            return
        if base != self.pkg and not base.startswith(self.pkg + "."):
            self._add(node, base)  # third-party: the module is what matters
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # ``from p.a import b``: the submodule p.a.b when there is one, else a name of p.a
            self._add(node, sub if sub in self.modules else base)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _DOTTED.fullmatch(arg.value):
                self._add(arg, arg.value)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        # lazy tables: {"public_name": "<package>.sub.module"}; loaded on demand, never at load time
        for value in node.values:
            if (isinstance(value, ast.Constant) and isinstance(value.value, str)
                    and _DOTTED.fullmatch(value.value)
                    and (value.value == self.pkg or value.value.startswith(self.pkg + "."))):
                self._add(value, value.value, load_time=False)
        self.generic_visit(node)


def collect_imports(root: Path) -> tuple[dict[str, Path], list[Import], list[str]]:
    """Every import of every module under ``root``, third-party ones included.

    Returns:
        ``(modules, imports, errors)``: dotted name -> file, the imports in file and line order,
        and one line per file that could not be read.
    """
    root = Path(root)
    pkg = root.name
    modules = module_files(root)
    imports: list[Import] = []
    errors: list[str] = []
    for module, path in modules.items():
        rel = path.relative_to(root.parent).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        except (SyntaxError, UnicodeDecodeError) as exc:
            errors.append(f"{rel}: could not be parsed ({exc})")
            continue
        collector = _Collector(module, path.name == "__init__.py", rel, pkg, set(modules))
        collector.visit(tree)
        imports.extend(collector.found)
        errors.extend(collector.errors)
    return modules, imports, errors


def _is_internal(target: str, pkg: str) -> bool:
    return target == pkg or target.startswith(pkg + ".")


def _resolve(target: str, modules: dict[str, Path], pkg: str) -> str | None:
    """The package module an import loads, or None when the package has no such module."""
    if target in modules:
        return target
    parts = target.split(".")
    if len(parts) >= 2 and parts[1] in OUTSIDE_MODULES:
        return target
    return None


def layer_of(module: str, pkg: str) -> str | None:
    """The layer of a dotted module name: a subpackage, ``api``, ``entry``, ``testing`` or None."""
    parts = module.split(".")
    if parts[0] != pkg:
        return None
    if len(parts) == 1:
        return "api"
    if parts[1] in RANKS or parts[1] == "testing":
        return parts[1]
    if parts[1] in OUTSIDE_MODULES:
        return OUTSIDE_MODULES[parts[1]]
    if len(parts) == 2 and parts[1] in ENTRY_MODULES:
        return "entry"
    return None


def _edge_problem(src: str, dst: str, source: str, target: str, pkg: str) -> str | None:
    """Why the import ``source -> target`` (layers ``src -> dst``) breaks the rule, or None."""
    if dst == "testing":
        return None if src == "testing" else "nothing in the package imports testing"
    if src == "entry":
        own = f"{pkg}.cli.{source.split('.')[-1]}"
        return None if target == own else f"an entry module imports only {own}"
    if dst in ("entry", "api"):
        return f"nothing imports the {dst} modules"
    if src == "testing":
        return None if RANKS[dst] <= TESTING_MAY_IMPORT else "testing imports nothing above runs and tools"
    if src == "api":
        return None if RANKS[dst] <= API_MAY_IMPORT else "the package __init__ imports nothing from cli"
    if src == dst:
        return None
    if frozenset({src, dst}) in SIBLINGS:
        return f"{src} and {dst} are siblings and never import each other"
    if RANKS[dst] >= RANKS[src]:
        return "imports go downward only"
    return None


def check_layers(root: Path) -> list[str]:
    """Imports between layers: downward only, siblings apart, testing imported by nobody."""
    root = Path(root)
    pkg = root.name
    modules, imports, errors = collect_imports(root)
    problems = list(errors)
    for module, path in modules.items():
        if layer_of(module, pkg) is None:
            problems.append(f"{path.relative_to(root.parent).as_posix()}: {module} is in no layer "
                            "(give it a layer in tests/test_architecture.py)")
    for imp in imports:
        if not _is_internal(imp.target, pkg):
            continue
        target = _resolve(imp.target, modules, pkg)
        if target is None:
            problems.append(f"{imp.path}:{imp.line} imports {imp.target}, which is no module of the package")
            continue
        src, dst = layer_of(imp.source, pkg), layer_of(target, pkg)
        if src is None or dst is None or target == imp.source:
            continue
        why = _edge_problem(src, dst, imp.source, target, pkg)
        if why:
            problems.append(f"{imp.path}:{imp.line} imports {target} (layer {src} -> layer {dst}): {why}")
    return problems


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph``, each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside one component."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in seen:
                seen.add(w)
                parent[w] = v
                queue.append(w)
    return [start, start]


def check_cycles(root: Path) -> list[str]:
    """Cycles in the import graph: every import across layers plus load-time imports within one.

    An import inside a function may break a load-order cycle within a subpackage; across
    subpackages every import counts (and the layer rule forbids the upward half anyway).
    """
    root = Path(root)
    pkg = root.name
    modules, imports, errors = collect_imports(root)
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for imp in imports:
        if not _is_internal(imp.target, pkg):
            continue
        target = _resolve(imp.target, modules, pkg)
        if target is None or target == imp.source:
            continue
        if imp.load_time or layer_of(imp.source, pkg) != layer_of(target, pkg):
            graph[imp.source].add(target)
            where.setdefault((imp.source, target), f"{imp.path}:{imp.line}")
    problems = list(errors)
    for comp in _strongly_connected(graph):
        if len(comp) < 2:
            continue
        cycle = _shortest_cycle(graph, comp[0], set(comp))
        lines = ", ".join(where[(a, b)] for a, b in zip(cycle, cycle[1:]))
        rest = f"; all of {', '.join(comp)} reach each other" if len(comp) > len(cycle) - 1 else ""
        problems.append(f"import cycle: {' -> '.join(cycle)} ({lines}){rest}")
    return problems


def check_third_party(root: Path) -> list[str]:
    """core imports no I/O, model or run library; argparse lives in cli (and testing) only."""
    root = Path(root)
    pkg = root.name
    _, imports, errors = collect_imports(root)
    problems = list(errors)
    for imp in imports:
        if _is_internal(imp.target, pkg):
            continue
        top = imp.target.split(".")[0]
        layer = layer_of(imp.source, pkg)
        if layer == "core" and top in CORE_FORBIDDEN:
            problems.append(f"{imp.path}:{imp.line} imports {imp.target} (core is tensors in/out: "
                            f"none of {', '.join(CORE_FORBIDDEN)})")
        elif top == "argparse" and layer not in ARGPARSE_LAYERS:
            problems.append(f"{imp.path}:{imp.line} imports argparse (layer {layer}): "
                            f"argparse lives in {pkg}/cli/ only")
    return problems


def check_package(root: Path) -> list[str]:
    """Every violation of the architecture under ``root``, one line each, no line twice."""
    seen: dict[str, None] = {}
    for line in check_layers(root) + check_cycles(root) + check_third_party(root):
        seen.setdefault(line, None)
    return list(seen)


def _report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n  " + "\n  ".join(problems)


# ---- the real package ----------------------------------------------------------------------


def test_collects_the_real_imports():
    """Guard against a walker that silently finds nothing: known edges of the package show up."""
    modules, imports, errors = collect_imports(ROOT)
    if errors:
        pytest.fail(_report("unreadable files", errors), pytrace=False)
    assert "pccfast.core.labeller" in modules and "pccfast" in modules
    edges = {(i.source, i.target) for i in imports}
    assert ("pccfast.generate", "pccfast.cli.generate") in edges
    assert ("pccfast", "pccfast.core.labeller") in edges  # from the lazy table
    assert ("pccfast.core.labeller", "pccfast.core.blocky") in edges


def test_layers():
    problems = check_layers(ROOT)
    if problems:
        pytest.fail(_report("imports against the layering (cli -> training -> runs/tools -> diffusion/data "
                            "-> core -> backends)", problems), pytrace=False)


def test_no_import_cycles():
    problems = check_cycles(ROOT)
    if problems:
        pytest.fail(_report("import cycles", problems), pytrace=False)


def test_third_party_placement():
    problems = check_third_party(ROOT)
    if problems:
        pytest.fail(_report("third-party imports in the wrong layer", problems), pytrace=False)


# ---- planted packages: each rule can fail --------------------------------------------------


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``pccfast`` under ``tmp_path`` with the given files (relative path -> source)."""
    root = tmp_path / "pccfast"
    for sub in ["", *RANKS, "testing"]:
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).write_text(text)
    return root


CLEAN = {
    "__init__.py": ("import importlib\nfrom pccfast.core.config import Config\n"
                    "_LAZY = {'label': 'pccfast.core.labeller', 'run': 'pccfast.runs.loop'}\n"),
    "generate.py": "from pccfast.cli.generate import main\n",
    "backends/native.py": "import ctypes\n",
    "core/config.py": "import dataclasses\n",
    "core/labeller.py": ("import torch\nfrom . import config\nfrom .config import Config\n"
                         "def f():\n    from pccfast.backends import native\n"),
    "diffusion/capture.py": "import diffusers\nimport pccfast.core.labeller\n",
    "data/writer.py": "from PIL import Image\nfrom pccfast.core import config\n",
    "runs/loop.py": ("import tqdm\nfrom pccfast.data.writer import x\n"
                     "def g():\n    import importlib\n    return importlib.import_module('pccfast.diffusion.capture')\n"),
    "tools/evaluate.py": "from pccfast.data import writer\n",
    "cli/generate.py": "import argparse\nfrom pccfast.runs import loop\nfrom pccfast.tools.evaluate import y\n",
    "testing/fixtures.py": "import argparse\nfrom pccfast.runs.loop import z\nfrom pccfast.data.writer import w\n",
    # a load-order cycle within one subpackage, broken by a function-level import: allowed
    "core/a.py": "from pccfast.core import b\n",
    "core/b.py": "def h():\n    from pccfast.core import a\n",
}


def test_clean_planted_package_passes(tmp_path):
    root = _plant(tmp_path, CLEAN)
    assert check_package(root) == []


def test_planted_cycle_and_upward_import_are_reported(tmp_path):
    root = _plant(tmp_path, {**CLEAN,
                             "core/a.py": "from pccfast.core import b\n",
                             "core/b.py": "from . import a\n",
                             "core/c.py": "import torch\n\n\ndef f():\n    from pccfast.runs import loop\n"})
    problems = check_package(root)
    assert ("import cycle: pccfast.core.a -> pccfast.core.b -> pccfast.core.a "
            "(pccfast/core/a.py:1, pccfast/core/b.py:1)") in problems
    assert ("pccfast/core/c.py:5 imports pccfast.runs.loop (layer core -> layer runs): "
            "imports go downward only") in problems
    assert len(problems) == 2, problems


@pytest.mark.parametrize("rel, text, expected", [
    ("data/bad.py", "from pccfast.diffusion import capture\n",
     "pccfast/data/bad.py:1 imports pccfast.diffusion.capture (layer data -> layer diffusion): "
     "data and diffusion are siblings and never import each other"),
    ("tools/bad.py", "import pccfast.runs.loop\n",
     "pccfast/tools/bad.py:1 imports pccfast.runs.loop (layer tools -> layer runs): "
     "tools and runs are siblings and never import each other"),
    ("runs/bad.py", "def f():\n    from ..cli.generate import main\n",
     "pccfast/runs/bad.py:2 imports pccfast.cli.generate (layer runs -> layer cli): imports go downward only"),
    ("core/bad.py", "from pccfast.testing.fixtures import make\n",
     "pccfast/core/bad.py:1 imports pccfast.testing.fixtures (layer core -> layer testing): "
     "nothing in the package imports testing"),
    ("testing/bad.py", "from pccfast.cli import generate\n",
     "pccfast/testing/bad.py:1 imports pccfast.cli.generate (layer testing -> layer cli): "
     "testing imports nothing above runs and tools"),
    ("merge.py", "from pccfast.cli.generate import main\n",
     "pccfast/merge.py:1 imports pccfast.cli.generate (layer entry -> layer cli): "
     "an entry module imports only pccfast.cli.merge"),
    ("__init__.py", "_LAZY = {'main': 'pccfast.cli.generate'}\n",
     "pccfast/__init__.py:1 imports pccfast.cli.generate (layer api -> layer cli): "
     "the package __init__ imports nothing from cli"),
    ("core/bad.py", "import importlib\nX = importlib.import_module('pccfast.data.writer')\n",
     "pccfast/core/bad.py:2 imports pccfast.data.writer (layer core -> layer data): imports go downward only"),
    ("core/bad.py", "from pccfast.core.gone import x\n",
     "pccfast/core/bad.py:1 imports pccfast.core.gone, which is no module of the package"),
    ("extras.py", "import os\n",
     "pccfast/extras.py: pccfast.extras is in no layer (give it a layer in tests/test_architecture.py)"),
    ("core/bad.py", "def f():\n    from PIL import Image\n",
     "pccfast/core/bad.py:2 imports PIL (core is tensors in/out: none of " + ", ".join(CORE_FORBIDDEN) + ")"),
    ("core/bad.py", "import safetensors.torch\n",
     "pccfast/core/bad.py:1 imports safetensors.torch (core is tensors in/out: none of "
     + ", ".join(CORE_FORBIDDEN) + ")"),
    ("data/bad.py", "import argparse\n",
     "pccfast/data/bad.py:1 imports argparse (layer data): argparse lives in pccfast/cli/ only"),
])
def test_planted_violation_is_reported(tmp_path, rel, text, expected):
    root = _plant(tmp_path, {**CLEAN, rel: text})
    assert check_package(root) == [expected]


def test_cross_layer_cycle_counts_function_level_imports(tmp_path):
    """Across subpackages a function-level import still closes a cycle (and is upward)."""
    root = _plant(tmp_path, {**CLEAN, "core/c.py": "def f():\n    from pccfast.data import writer\n",
                             "data/writer.py": "from pccfast.core import c\n"})
    problems = check_cycles(root)
    assert problems == ["import cycle: pccfast.core.c -> pccfast.data.writer -> pccfast.core.c "
                        "(pccfast/core/c.py:2, pccfast/data/writer.py:1)"]


def test_type_checking_imports_are_not_load_time(tmp_path):
    """Imports under ``if TYPE_CHECKING:`` obey the layers but close no load-order cycle."""
    root = _plant(tmp_path, {**CLEAN, "core/b.py": ("from typing import TYPE_CHECKING\n"
                                                    "if TYPE_CHECKING:\n    from pccfast.core import a\n")})
    assert check_package(root) == []
    _, imports, _ = collect_imports(root)
    assert [i.load_time for i in imports if i.source == "pccfast.core.b" and i.target == "pccfast.core.a"] == [False]
