"""The imports of src/feda2v: no circles, and no part importing a part above it (DESIGN.md's order).

Every import statement counts, also those inside functions (a lazy import is still a dependency).
Importing one's own ancestor package is not an edge: Python initialises it first anyway; neither is
an import under ``if TYPE_CHECKING:`` (never executed).
"""
import ast
from pathlib import Path

import feda2v

SRC = Path(feda2v.__file__).parent
# bottom to top, as in DESIGN.md's part table (errors/seeding/fsutil share the bottom, with the two
# leaf utilities DESIGN.md does not list yet: numerics (CPU numeric paths) and progress (step bars),
# and malloc (the entry points' allocator settings))
ORDER = ["errors", "seeding", "fsutil", "numerics", "progress", "malloc", "models", "config", "profiling", "store", "data", "checkpoint",
         "federation", "tracking", "evaluate", "pipeline", "cli"]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imported(mod: str, path: Path, node: ast.AST, mods: dict) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    # `import feda2v.a.b` depends on feda2v.a.b; a name that is not a module is an attribute
    return {n for n in names if n in mods}


def _type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement that can run (``if TYPE_CHECKING:`` bodies left out, their else kept)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _imported(mod, path, node, mods):
                if target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def part_rank(mod: str):
    bits = mod.split(".")
    return ORDER.index(bits[1]) if len(bits) > 1 and bits[1] in ORDER else None


def circles(graph) -> list[list[str]]:
    found, state, stack = [], {}, []

    def walk(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                walk(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return found


def upward(graph) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if part_rank(a) is not None and part_rank(b) is not None and part_rank(b) > part_rank(a))


def test_every_part_is_in_the_order():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts <= set(ORDER), sorted(parts - set(ORDER))


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_no_import_runs_upward():
    assert upward(import_graph()) == []


def test_federation_never_imports_pipeline():
    graph = import_graph()
    assert not [(a, b) for a, ts in graph.items() for b in ts
                if a.startswith("feda2v.federation") and b.startswith("feda2v.pipeline")]


def test_the_checker_sees_circles_and_upward_imports():
    """The walk itself can fail: a made-up graph with a circle and an upward edge is caught."""
    g = {"feda2v.data.a": {"feda2v.data.b"}, "feda2v.data.b": {"feda2v.data.a", "feda2v.pipeline.x"},
         "feda2v.pipeline.x": set()}
    assert circles(g) == [["feda2v.data.a", "feda2v.data.b", "feda2v.data.a"]]
    assert upward(g) == ["feda2v.data.b -> feda2v.pipeline.x"]
    typing_only = ast.parse("if TYPE_CHECKING:\n    import feda2v.pipeline\nelse:\n    import feda2v.cli\n")
    assert [n.names[0].name for n in _imports(typing_only)] == ["feda2v.cli"]
    mods = _modules()
    lazy = ast.parse("def f():\n    from feda2v.pipeline import train\n")
    assert _imported("feda2v.federation.engine", mods["feda2v.federation.engine"], lazy.body[0].body[0],
                     mods) == {"feda2v.pipeline", "feda2v.pipeline.train"}
