"""nbkit's shape: layered subpackages, each importing only the layers before it, and no import cycle.

Every import counts, function-level ones too (a function-level import is a cycle waiting for a call). The package
root (nbkit/__init__.py, the curated API) may import anything; no module imports it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nbkit"
LAYERS = [  # in order: a module may import its own layer and the ones before it
    {"nbkit.config", "nbkit.paths", "nbkit.safeio", "nbkit.errors", "nbkit.units", "nbkit.version"},
    "env", "models", "sample", "data", "toy", "export", "scores", "training", "memory", "notebook",
    {"nbkit.cli", "nbkit.__main__"},
]


def modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def layer(name: str) -> int:
    for i, group in enumerate(LAYERS):
        if isinstance(group, set) and name in group:
            return i
        if isinstance(group, str) and (name == f"nbkit.{group}" or name.startswith(f"nbkit.{group}.")):
            return i
    raise AssertionError(f"{name} belongs to no layer: add it to tests/test_layers.py's LAYERS")


def imports(name: str, source: str, mods: dict) -> set[str]:
    """The nbkit modules `source` (module `name`) imports, at any depth of the code."""
    pkg = name if mods.get(name, Path()).name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            cands = subs or [base]  # `from nbkit.toy import world` imports nbkit.toy.world, not all of nbkit.toy
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            while c and c not in mods:
                c = c.rsplit(".", 1)[0] if "." in c else ""
            if c.startswith("nbkit") and c != name:
                found.add(c)
    return found


def graph(mods: dict | None = None) -> dict[str, set[str]]:
    mods = mods or modules()
    return {name: imports(name, p.read_text(), mods) for name, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, deps in g.items():
        if name == "nbkit":
            continue
        for d in deps:
            if d == "nbkit":
                bad.append(f"{name} imports the package root (the curated API): import the module itself")
            elif layer(d) > layer(name):
                bad.append(f"{name} (layer {layer(name)}) imports {d} (layer {layer(d)})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    g = {k: {d for d in v if d in g and d != "nbkit"} for k, v in g.items() if k != "nbkit"}
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(g):
        if v not in index:
            strong(v)
    return found


def test_every_module_imports_only_its_layer_and_the_ones_before():
    assert upward(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_every_module_has_a_layer_and_files_stay_small():
    for name, path in modules().items():
        if name != "nbkit":
            layer(name)
        assert len(path.read_text().splitlines()) <= 450, f"{path}: over 450 lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "validate":
                assert node.end_lineno - node.lineno < 60, f"{path}:{node.name} over 60 lines"


@pytest.mark.parametrize("source,problem", [
    ("from nbkit.training import loop\n", "imports nbkit.training.loop"),  # upward, at module level
    ("def f():\n    from nbkit.memory.planner import plan\n", "imports nbkit.memory.planner"),  # in a function
    ("import nbkit\n", "imports the package root"),
])
def test_the_checks_catch_an_upward_import_and_a_cycle(source, problem):
    mods = modules()
    g = graph(mods)
    g["nbkit.env.runtime"] = g["nbkit.env.runtime"] | imports("nbkit.env.runtime", source, mods)
    assert any(problem in line for line in upward(g))
    g = graph(mods)  # and a cycle inside one layer (which the layer order alone allows)
    g["nbkit.models.parts"] = g["nbkit.models.parts"] | {"nbkit.models.sd15"}
    g["nbkit.models.sd15"] = g["nbkit.models.sd15"] | {"nbkit.models.parts"}
    assert cycles(g) == [["nbkit.models.parts", "nbkit.models.sd15"]]
