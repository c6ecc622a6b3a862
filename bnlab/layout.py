"""The package's layers and the rule its imports keep: each module imports only modules of the
layers below its own, and those of its own subpackage (without circles).

`python -m bnlab.layout` lists the imports that break the rule (exit 1 when there are any);
`tests/test_layout.py` runs the same check. Every import statement counts, lazy ones inside
functions too. A new module goes into the subpackage of its responsibility; a new subpackage
takes a place in `LAYERS`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Bottom to top. Units in one tuple are siblings: neither may import the other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bnlab.types",),
    ("bnlab.schema",),
    ("bnlab.registry",),
    ("bnlab.ops",),  # the pure normalizations: arrays in, arrays out, no Flax
    ("bnlab.data",),  # MNIST: IDX files, the TFDS builder, the whole-array copy, load()
    ("bnlab.nn",),  # Flax: linen and NNX layers, models, the normalization registry
    ("bnlab.diagnostics", "bnlab.optim"),  # the instruments' registry; config -> optax chain
    ("bnlab.config",),  # groups, experiment files, overrides, validation
    ("bnlab.training",),  # the state and step, epochs, loop, runs, records, checkpoints
    ("bnlab.studies",),  # sweeps, results and statistics, reports, figures
    ("bnlab.export",),  # a run's checkpoint to .npz / PyTorch
    ("bnlab.cli",),  # the command: parses, then calls the layers below
    # The public paths users import (nothing inside the package may import them).
    (
        "bnlab",
        "bnlab.norm",
        "bnlab.norms",
        "bnlab.layers",
        "bnlab.models",
        "bnlab.nnx",
        "bnlab.results",
        "bnlab.layout",
        "bnlab._moved",
    ),  # fmt: skip
)
PACKAGE = Path(__file__).resolve().parent


def rank(module: str) -> tuple[int, str]:
    """`(layer, unit)` of a module: the layer's index in `LAYERS` and the unit it belongs to."""
    best = None
    for i, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (
                best is None or len(unit) > len(best[1])
            ):
                best = (i, unit)
    if best is None:
        raise ValueError(f"{module} is in no layer of bnlab.layout.LAYERS; give it a place there")
    return best


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """`module -> the bnlab modules it imports` (at the top or inside functions)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m and (name != "bnlab" or m == "bnlab"):
                    graph[m].add(name)
                    break
    return graph


def problems(root: Path = PACKAGE) -> list[str]:
    """The imports that point up or sideways across units, and the circles."""
    graph = imports(root)
    out = []
    for m, targets in sorted(graph.items()):
        layer, unit = rank(m)
        for t in sorted(targets):
            t_layer, t_unit = rank(t)
            if t_unit == unit or m == "bnlab":
                continue
            if t_layer >= layer:
                out.append(
                    f"{m} (layer {layer}, {unit}) imports {t} (layer {t_layer}, {t_unit}): "
                    "imports point down; move the shared piece to a lower layer"
                )
    out += [f"import circle: {' <-> '.join(c)}" for c in _circles(graph)]
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each circle of imports, sorted (Tarjan's strongly connected components; a
    package's `__init__` importing its own submodules is not a circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            head = min(component, key=len)
            if len(component) > 1 and not all(
                c == head or c.startswith(head + ".") for c in component
            ):
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) or f"{len(modules())} modules: every import points down, no circles")
    sys.exit(1 if found else 0)
