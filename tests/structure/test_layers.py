"""The layers of the core package (``core/dsr1/``), read from its folder tree, and a check of
every ``dsr1.*`` import against them.

* A module-level import (``TYPE_CHECKING`` blocks included: a type is a dependency too) stays in
  its own layer or goes down, and module-level imports form no cycle at all.
* A function-level (lazy) import may go up, or close a cycle, only where :data:`ALLOWED` lists it
  with the reason; an entry that no longer matches such an import fails too, so the list shrinks.

The same table is the "Layers" section of docs/architecture.md.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"

#: Lowest first. An entry is a module or folder of ``core/dsr1/``; a dotted entry places one module
#: apart from its folder (the longest matching entry wins).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # what everything imports: errors, plugin records, the config, the family base classes
    ("base", ("dsr1", "errors", "distributions", "specs", "config", "hookspecs", "interfaces", "input_files",
              "outputs", "output_files", "progress", "corpus", "hugepages",
              # plain data that the base classes and the scheduler family share; they live beside the code that
              # owns them, and their packages' __init__ import nothing at run time (see the last test)
              "decoding.params", "engine.request", "engine.plan", "engine.blocks", "engine.swap_space")),
    # the builtin plugins of each family, and what the quant plugins share; no family imports another layer up
    ("families", ("models", "preprocess", "kvcache", "decoding", "scheduler", "graph", "pool", "monitor",
                  "quantization", "pruning", "parallel")),
    # plugin assembly: the registry loads the families and resolves a config into a Pipeline
    ("assembly", ("pipeline", "device_select", "registry")),
    # the loop and its front doors: Engine, model.generate, AutoModel
    ("engine", ("engine", "generation", "auto")),
    # programs built on the engine: the HTTP server, the benchmarks, the prune and quantize drivers
    ("apps", ("serve", "benchmarks", "tasks")),
    # the command line
    ("entry", ("commands", "cli", "__main__")),
)

#: (importer, imported) → why. Lazy imports that go up a layer or close a cycle; nothing else.
ALLOWED: dict[tuple[str, str], str] = {
    # transformers' methods on the model: the model is a torch module, and these two hand the call to the
    # code that implements them, which imports the model classes
    ("models.common", "generation"): "model.generate() runs dsr1.generation (the engine loop)",
    ("models.common", "models.loading"): "model.save_pretrained() runs the checkpoint writer",
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted, without the leading "dsr1."
    imported: str
    lazy: bool  # inside a function
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line}{', lazy' if self.lazy else ''})"


def _modules() -> dict[str, Path]:
    """Every module of core/dsr1 by dotted name without "dsr1." (the package itself is "dsr1")."""
    found: dict[str, Path] = {}
    for path in sorted((CORE / "dsr1").rglob("*.py")):
        parts = path.relative_to(CORE / "dsr1").with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "dsr1"] = path
    return found


MODULES = _modules()


def _target(dotted: str) -> str:
    """The module a ``dsr1.*`` import names (``from dsr1.x import y`` names ``x.y`` when that is a module)."""
    if dotted == "dsr1":
        return "dsr1"
    name = dotted.removeprefix("dsr1.")
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or "dsr1"


def _imports(module: str, path: Path) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node: ast.AST, lazy: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from .x import y
                    base = "dsr1." + package if package != "dsr1" else "dsr1"
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{child.module}" if child.module else base
                else:
                    source = child.module or ""
                names = [f"{source}.{a.name}" for a in child.names]
            for name in names:
                if name == "dsr1" or name.startswith("dsr1."):
                    target = _target(name)
                    if target != module:
                        yield Import(module, target, inner, child.lineno)
            yield from walk(child, inner)

    yield from walk(tree, False)


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def layer(module: str) -> int:
    """Index in :data:`LAYERS` of the longest entry that is ``module`` or a folder above it."""
    best, found = -1, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best:
                best, found = len(entry), index
    return found


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _upward(imp: Import) -> bool:
    return layer(imp.imported) > layer(imp.importer)


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in MODULES if layer(m) < 0)
    assert not missing, f"modules in no layer (add their folder to LAYERS and docs/architecture.md): {missing}"


def test_module_level_imports_stay_in_their_layer_or_go_down() -> None:
    bad = [str(i) for i in IMPORTS if not i.lazy and _upward(i)]
    assert not bad, f"module-level imports of a higher layer (move the shared part down): {bad}"


def test_module_level_imports_form_no_cycle() -> None:
    cycles = _cycles({(i.importer, i.imported) for i in IMPORTS if not i.lazy})
    assert not cycles, f"module-level import cycles (move what both sides use into a module below both): {cycles}"


def test_lazy_imports_go_up_only_where_listed() -> None:
    bad = [str(i) for i in IMPORTS if i.lazy and _upward(i) and (i.importer, i.imported) not in ALLOWED]
    assert not bad, f"lazy imports of a higher layer that ALLOWED does not list: {bad}"


def test_no_cycle_but_through_a_listed_lazy_import() -> None:
    cycles = _cycles({(i.importer, i.imported) for i in IMPORTS} - set(ALLOWED))
    assert not cycles, f"import cycles, lazy imports included, that no ALLOWED entry explains: {cycles}"


def test_every_listed_import_is_still_needed() -> None:
    every = {(i.importer, i.imported) for i in IMPORTS}
    in_cycle = {m: n for n, cycle in enumerate(_cycles(every)) for m in cycle}
    lazy = {(i.importer, i.imported) for i in IMPORTS if i.lazy}
    stale = [edge for edge in ALLOWED if edge not in lazy or not (
        layer(edge[1]) > layer(edge[0]) or in_cycle.get(edge[0], -1) == in_cycle.get(edge[1], -2))]
    assert not stale, f"ALLOWED entries that no import needs any more (delete them): {stale}"


def test_a_package_that_lends_a_module_to_a_lower_layer_imports_nothing_at_run_time() -> None:
    """Importing ``dsr1.engine.request`` runs ``dsr1/engine/__init__.py`` first: it must stay import-free."""
    lent = {entry.rpartition(".")[0] for _, entries in LAYERS for entry in entries if "." in entry}
    heavy = []
    for package in sorted(lent):
        tree = ast.parse(MODULES[package].read_text(encoding="utf-8"))
        for node in tree.body:  # only the top level runs on import; TYPE_CHECKING blocks never run
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (
                    isinstance(node, ast.ImportFrom) and node.module in ("__future__", "typing")):
                heavy.append(f"{package}: line {node.lineno}")
    assert not heavy, f"packages whose __init__ imports at run time (a lower layer imports their modules): {heavy}"
