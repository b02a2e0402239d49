"""The shape of the package: one-way dependencies, no import cycles, small files and functions.

Every module under ``src/dropgeom`` is parsed with :mod:`ast` (nothing is
imported), and every ``import`` statement is collected: module-level ones
*and* those inside functions and methods, which hide cycles from Python's
import machinery but not from a reader. Imports inside ``if TYPE_CHECKING:``
blocks are skipped (they never run). The edges of the graph:

* ``from X import name``: ``X`` (its ``__init__`` runs) and ``X.name`` when that
  is a module. When ``X`` is a package that contains the importer (``from ..
  import ModelManifold``), its ``__init__`` has already run, so the edge goes to
  the module that defines ``name`` (following ``from .sub import name`` re-exports);
* ``import X.Y``: ``X.Y`` and each enclosing package that does not contain the importer.

Layer order (issue #8, item 5), low to high; a module may import only its own
layer or lower ones:

    base (families, operators, solvers, the shared helpers ``_utils``, the typed run ``summary``)
    -> manifold -> core (fisher, curvature, dropout, data) -> train (and the package facade
    ``dropgeom``) -> experiments (with config, rundir) -> report -> cli (with ``pipeline``)

plus one rule beyond the order: the report imports no experiment code.

Known violations are listed below with the issue they belong to. The lists
are strict both ways: a new cycle or violation fails, and so does an entry
that no longer occurs (remove it, so the lists only shrink). Files over
:data:`MAX_FILE_LINES` lines and functions over :data:`MAX_FUNCTION_LINES`
(counted from the ``def`` or first decorator to the last line, docstring
included) follow the same rule.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dropgeom"

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

#: Layers, lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    (
        "base",
        (
            "dropgeom.options",
            "dropgeom.families",
            "dropgeom.operators",
            "dropgeom.operator_parts",
            "dropgeom.solvers",
            "dropgeom._intercept",
            "dropgeom._utils",
            "dropgeom._evaluation",
            "dropgeom.summary",
            "dropgeom._registry",
            "dropgeom.linalg",
            "dropgeom.allocator",
        ),
    ),
    ("manifold", ("dropgeom.manifold", "dropgeom.batches", "dropgeom.dispatch")),
    (
        "core",
        (
            "dropgeom._fisher",
            "dropgeom._fisher_structures",
            "dropgeom.layer_rules",
            "dropgeom._capture",
            "dropgeom.curvature",
            "dropgeom.dropout",
            "dropgeom.data",
            "dropgeom.datafiles",
            "dropgeom.streaming",
        ),
    ),
    ("train", ("dropgeom.train", "dropgeom")),  # ``dropgeom`` itself: the facade re-exports core and train
    (
        "experiments",
        (
            "dropgeom.experiments",
            "dropgeom.config",
            "dropgeom.config_checks",
            "dropgeom.rundir",
            "dropgeom.pool",
            "dropgeom.executors",
        ),
    ),
    ("report", ("dropgeom.report",)),
    ("cli", ("dropgeom.cli", "dropgeom.cli_support", "dropgeom.cli_train", "dropgeom.__main__", "dropgeom.pipeline")),
]

#: Imports forbidden although the layer order allows them.
FORBIDDEN: List[Tuple[str, str, str]] = [
    (
        "dropgeom.report",
        "dropgeom.experiments",
        "the report receives a typed summary and imports no experiment code (issue #8, item 5)",
    )
]

#: Edges that close an import cycle today (importer, imported).
KNOWN_CYCLE_EDGES: Dict[Tuple[str, str], str] = {}

#: Imports against the layer order (or FORBIDDEN) today (importer, imported).
KNOWN_LAYER_VIOLATIONS: Dict[Tuple[str, str], str] = {}

#: Files over MAX_FILE_LINES today (paths relative to src/).
KNOWN_LONG_FILES: Dict[str, str] = {
    # grown in the session that worked on issues 9-14 in parallel; split them next (issue #8 acceptance)
}

#: Functions over MAX_FUNCTION_LINES today ("path:qualified name", paths relative to src/).
KNOWN_LONG_FUNCTIONS: Dict[str, str] = {
    # grown in the session that worked on issues 9-14 in parallel; split them next
}


# --------------------------------------------------------------------------- parsing
def _modules() -> Dict[str, pathlib.Path]:
    """``{dotted module name: path}`` for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def _walk_runtime(node: ast.AST) -> Iterator[ast.AST]:
    """``ast.walk`` that skips ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for sub in child.orelse:
                yield sub
                yield from _walk_runtime(sub)
            continue
        yield child
        yield from _walk_runtime(child)


def _base(importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer if _is_package(importer) else importer.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _defining_module(package: str, name: str, seen: Set[Tuple[str, str]] = frozenset()) -> str:
    """The module that defines ``name`` re-exported by ``package``'s ``__init__`` (or ``package`` itself)."""
    if (package, name) in seen:
        return package
    seen = set(seen) | {(package, name)}
    for node in TREES[package].body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _base(package, node)
                    if f"{source}.{alias.name}" in MODULES:
                        return f"{source}.{alias.name}"
                    if source in MODULES and _is_package(source):
                        return _defining_module(source, alias.name, seen)
                    return source if source in MODULES else package
    return package


def _edges_of(importer: str) -> Set[str]:
    out: Set[str] = set()
    inside = set(_ancestors(importer)) | ({importer} if _is_package(importer) else set())

    def add(target: str) -> None:
        if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
            return
        for anc in _ancestors(target):
            if anc not in inside and anc in MODULES:
                out.add(anc)
        if target in MODULES and target != importer:
            out.add(target)

    for node in _walk_runtime(TREES[importer]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _base(importer, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    add(sub)
                elif base in inside:
                    add(_defining_module(base, alias.name))
                else:
                    add(base)
            if base not in inside:
                add(base)
    return out


GRAPH: Dict[str, Set[str]] = {name: _edges_of(name) for name in MODULES}
EDGES: Set[Tuple[str, str]] = {(a, b) for a, targets in GRAPH.items() for b in targets}


def _strongly_connected(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """Tarjan's algorithm (iterative); components with more than one module or a self-loop."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    comps: List[Set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.add(top)
                    if top == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    comps.append(comp)
    return comps


def _layer(module: str) -> int:
    best, rank = -1, None
    for k, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), k
    # the bare package prefix "dropgeom" matches everything: only a listed top-level module may use it
    if rank is None or (best == len(PACKAGE) and module != PACKAGE):
        raise AssertionError(f"module {module} belongs to no layer: add it (or its package) to LAYERS in {__file__}")
    return rank


def _violations() -> Dict[Tuple[str, str], str]:
    out = {}
    for a, b in sorted(EDGES):
        if _layer(b) > _layer(a):
            out[(a, b)] = f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for src, dst, why in FORBIDDEN:
            if (a == src or a.startswith(src + ".")) and (b == dst or b.startswith(dst + ".")):
                out[(a, b)] = f"{a} imports {b}: {why}"
    return out


# --------------------------------------------------------------------------- tests
def test_the_parser_sees_module_level_function_local_and_reexported_imports():
    # module level, relative
    assert "dropgeom.manifold" in GRAPH["dropgeom._fisher"]
    # function-local (experiments/figures.py imports rundir inside the function that saves a figure)
    assert "dropgeom.rundir" in GRAPH["dropgeom.experiments.figures"]
    # `from .. import ModelManifold` inside experiments.common resolves through the facade to the manifold
    assert "dropgeom.manifold" in GRAPH["dropgeom.experiments.common"]
    assert PACKAGE not in GRAPH["dropgeom.experiments.common"]
    # importing a submodule of another package runs that package's __init__
    assert "dropgeom.dropout" in GRAPH["dropgeom.experiments.c3_units"]


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_new_import_cycle():
    remaining = {a: {b for b in targets if (a, b) not in KNOWN_CYCLE_EDGES} for a, targets in GRAPH.items()}
    cycles = _strongly_connected(remaining)
    assert not cycles, "import cycles (function-local imports included):\n" + "\n".join(" <-> ".join(sorted(c)) for c in cycles)


def test_known_cycle_edges_still_close_a_cycle():
    in_cycle = {m: i for i, comp in enumerate(_strongly_connected(GRAPH)) for m in comp}
    stale = [
        f"{a} -> {b} ({why})"
        for (a, b), why in KNOWN_CYCLE_EDGES.items()
        if (a, b) not in EDGES or a not in in_cycle or in_cycle.get(a) != in_cycle.get(b)
    ]
    assert not stale, "no longer part of an import cycle: remove from KNOWN_CYCLE_EDGES:\n" + "\n".join(stale)


def test_no_new_layer_violation():
    new = [msg for edge, msg in _violations().items() if edge not in KNOWN_LAYER_VIOLATIONS]
    assert not new, "imports against the layer order:\n" + "\n".join(new)


def test_known_layer_violations_still_occur():
    found = _violations()
    stale = [f"{a} -> {b} ({why})" for (a, b), why in KNOWN_LAYER_VIOLATIONS.items() if (a, b) not in found]
    assert not stale, "fixed: remove from KNOWN_LAYER_VIOLATIONS:\n" + "\n".join(stale)


def _long_files() -> Dict[str, int]:
    out = {}
    for path in MODULES.values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            out[path.relative_to(SRC).as_posix()] = lines
    return out


def _long_functions() -> Dict[str, int]:
    out = {}
    for path in MODULES.values():
        rel = path.relative_to(SRC).as_posix()

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = prefix + child.name
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    length = child.end_lineno - start + 1
                    if length > MAX_FUNCTION_LINES:
                        out[f"{rel}:{name}"] = length
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text()), "")
    return out


@pytest.mark.parametrize(
    "found, known, limit, what",
    [
        (_long_files, KNOWN_LONG_FILES, MAX_FILE_LINES, "KNOWN_LONG_FILES"),
        (_long_functions, KNOWN_LONG_FUNCTIONS, MAX_FUNCTION_LINES, "KNOWN_LONG_FUNCTIONS"),
    ],
    ids=["files", "functions"],
)
def test_size_limits(found, known, limit, what):
    sizes = found()
    new = [f"{k}: {n} lines (limit {limit})" for k, n in sorted(sizes.items()) if k not in known]
    stale = [f"{k} ({why})" for k, why in known.items() if k not in sizes]
    assert not new, f"over the size limit (split it; do not add it to {what}):\n" + "\n".join(new)
    assert not stale, f"now within the limit: remove from {what}:\n" + "\n".join(stale)
