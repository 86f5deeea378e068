"""The package's layering, read from the source with ``ast`` (nothing is imported).

Layers, a lower one never importing a higher one (docs/architecture.md):

0. core: the top-level modules of ``phantom_plugin`` (placement, comm, ops, layers, ...);
1. ``phantom_plugin.modeling`` (cost and step-time models, datasheets);
2. the adapters ``phantom_plugin.megatron``, ``phantom_plugin.deepspeed`` and
   ``phantom_plugin.dtensor`` (PyTorch's DTensor/FSDP2 stack; none imports another);
3. ``phantom_plugin.bench`` (the benchmark harness);
4. ``phantom_plugin.cli`` (``phantom-plan``, ``phantom-bench``);
5. ``phantom_plugin.integrations`` (the top-level folder ``integrations/``, installed under that
   name by setup.py).

Every ``import`` counts, those inside functions included, except under ``if TYPE_CHECKING:``.
An import of a package is an import of its ``__init__``; ``from pkg import name`` is an import of
the submodule ``pkg.name`` when there is one, else of ``pkg``. Parents that Python imports
implicitly (``pkg`` before ``pkg.mod``) are not edges. Dynamic imports (``importlib``) are not
seen. Scripts in benchmarks/ and examples/ are users of the package: they use public names only.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent
PKG = "phantom_plugin"
SOURCES = {PKG: ROOT / "phantom_plugin", f"{PKG}.integrations": ROOT / "integrations"}
LAYERS = {"modeling": 1, "megatron": 2, "deepspeed": 2, "dtensor": 2, "bench": 3, "cli": 4, "integrations": 5}
ADAPTERS = ("megatron", "deepspeed", "dtensor")
LAYER_NAMES = {0: "core", 1: "modeling", 2: "adapter", 3: "bench", 4: "cli", 5: "integrations"}


@dataclass(frozen=True)
class Import:
    """One ``import`` statement's resolved target: ``source`` imports ``target`` at ``file:line``."""
    source: str
    target: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


def _module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package (``__init__`` as the package)."""
    mods = {}
    for prefix, root in SOURCES.items():
        for f in sorted(root.rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([prefix, *parts])] = f
    return mods


def _namespaces() -> set[str]:
    """Every package of the tree, ``__init__.py`` or not (``modeling`` and ``cli`` have none)."""
    out = set()
    for prefix, root in SOURCES.items():
        out.add(prefix)
        for d in root.rglob("*"):
            if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")):
                out.add(".".join([prefix, *d.relative_to(root).parts]))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _raw_imports(name: str, file: Path, is_package: bool):
    """``(absolute dotted name, imported names or None, line)`` for each import of ``file``;
    ``names`` is the list of ``from X import names`` (None for a plain ``import X``)."""
    tree = ast.parse(file.read_text(), filename=str(file))
    package = name if is_package else name.rpartition(".")[0]
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        else:
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise AssertionError(f"{file}:{node.lineno}: relative import beyond the top package")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield mod, [a.name for a in node.names], node.lineno


def _rel(file: Path) -> str:
    return str(file.relative_to(ROOT))


def _graph() -> list[Import]:
    """The package's internal imports, resolved to modules of :func:`_module_files` (or to a
    package without ``__init__.py``)."""
    files = _module_files()
    known = set(files) | _namespaces()
    edges = []
    for name, file in files.items():
        for mod, names, line in _raw_imports(name, file, file.name == "__init__.py"):
            if mod != PKG and not mod.startswith(PKG + "."):
                continue
            targets = []
            if names is None:
                targets.append(mod)
            else:
                for n in names:
                    sub = f"{mod}.{n}"
                    targets.append(sub if sub in known else mod)
            for t in dict.fromkeys(targets):
                if t not in known:
                    raise AssertionError(f"{_rel(file)}:{line}: {t} is not a module of the package")
                if t != name:
                    edges.append(Import(name, t, _rel(file), line))
    return edges


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] not in LAYERS:
        return 0
    return LAYERS[parts[1]]


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return _graph()


def test_every_subpackage_has_a_layer():
    """A new folder under phantom_plugin/ must be placed in a layer here (else it would count as core)."""
    subs = {d.name for d in SOURCES[PKG].iterdir() if d.is_dir() and any(d.glob("*.py"))}
    assert subs <= set(LAYERS), f"folders without a layer: {sorted(subs - set(LAYERS))}"


def test_graph_sees_the_imports(graph):
    """Not vacuous: known edges are found, relative and absolute, at module level and in functions."""
    pairs = {(e.source, e.target) for e in graph}
    assert (f"{PKG}.layers", f"{PKG}.ops") in pairs
    assert any(s.startswith(f"{PKG}.deepspeed") and t == f"{PKG}.comm" for s, t in pairs)
    assert any(s.startswith(f"{PKG}.integrations") for s, _ in pairs)
    # phantom_plugin/__init__ imports its public names under TYPE_CHECKING only
    assert not [e for e in graph if e.source == PKG], [str(e) for e in graph if e.source == PKG]


def _cycles(graph: list[Import]) -> list[list[Import]]:
    """One cycle (as its edges) per strongly connected component with more than one module."""
    adj: dict[str, list[Import]] = {}
    for e in graph:
        adj.setdefault(e.source, []).append(e)
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def strong(v):                          # Tarjan, recursive: the graph has ~60 nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for e in adj.get(v, []):
            w = e.target
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(adj):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:                      # a path back to the start inside the component (BFS)
        start = min(comp)
        prev: dict[str, Import] = {}
        frontier, seen = [start], {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for e in adj.get(v, []):
                    if e.target not in comp:
                        continue
                    if e.target == start:
                        found = e
                        break
                    if e.target not in seen:
                        seen.add(e.target)
                        prev[e.target] = e
                        nxt.append(e.target)
                if found:
                    break
            frontier = nxt
        path = [found]
        while path[0].source != start:
            path.insert(0, prev[path[0].source])
        cycles.append(path)
    return cycles


def test_no_import_cycles(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        "  " + " -> ".join([c[0].source] + [e.target for e in c]) + "\n" + "".join(f"    {e}\n" for e in c)
        for c in cycles)


def test_no_upward_imports(graph):
    """A module imports only modules of its own layer or a lower one."""
    up = [e for e in graph if _layer(e.target) > _layer(e.source)]
    assert not up, "imports of a higher layer:\n" + "\n".join(
        f"  {e}  ({LAYER_NAMES[_layer(e.source)]} -> {LAYER_NAMES[_layer(e.target)]})" for e in up)


def _adapter(mod: str):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ADAPTERS else None


def test_adapters_do_not_import_each_other(graph):
    cross = [e for e in graph if _adapter(e.source) and _adapter(e.target)
             and _adapter(e.source) != _adapter(e.target)]
    assert not cross, "one adapter imports the other:\n" + "\n".join(f"  {e}" for e in cross)


def test_core_and_modeling_import_neither_megatron_nor_deepspeed():
    """Neither the adapters nor the frameworks themselves (``megatron``, ``deepspeed``), even
    lazily: only the adapters and their tests need them."""
    bad = []
    for name, file in _module_files().items():
        if _layer(name) > 1:
            continue
        for mod, _, line in _raw_imports(name, file, file.name == "__init__.py"):
            top = mod.split(".")
            if top[0] in ADAPTERS or (top[0] == PKG and len(top) > 1 and top[1] in ADAPTERS):
                bad.append(f"{_rel(file)}:{line}: {name} imports {mod}")
    assert not bad, "\n".join(bad)


def _private_uses() -> list[str]:
    """Imports of a private name or module of the package by benchmarks/*.py and examples/*.py."""
    bad = []
    for file in sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")]):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                names = [(a.name, a.name) for a in node.names]
            elif node.level == 0 and node.module:
                names = [(node.module, f"{node.module}.{a.name}") for a in node.names]
            else:
                continue
            for mod, full in names:
                if mod.split(".")[0] != PKG:
                    continue
                private = [p for p in full.split(".") if p.startswith("_")]
                if private:
                    bad.append(f"{_rel(file)}:{node.lineno}: {full}")
    return bad


def test_scripts_import_only_public_names():
    """benchmarks/ and examples/ use the package as a user would: no ``_name``, no ``_module``."""
    bad = _private_uses()
    assert not bad, "private names imported:\n" + "\n".join(f"  {b}" for b in bad)
