"""The import direction docs/design.md states ("Data flow (one way)"), read from the source with ``ast``.

Every module under ``jaxprune/`` sits in one layer of :data:`LAYERS`; a module may import (at module level or inside
a function) only modules of lower layers and its own package's submodules. A new module must be placed in the
table, so the layering stays written down. ``train`` imports nothing about pruning, and nothing in the library
imports ``experiments`` or ``benchmarks``.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIB = ROOT / "jaxprune"

# Top-level library modules (a package counts as one module) by layer; docs/design.md draws the same picture.
LAYERS: dict[str, int] = {
    "_validate": 0, "_compat": 0, "conventions": 1,
    "data": 2, "models": 2, "augment": 2, "distributed": 2, "checkpoint": 2, "plots": 2, "masks": 2,
    "similarity": 2,
    "train": 3, "patterns": 3, "graph": 3, "unit_criteria": 3,
    "replicas": 4, "structured": 4, "lrp": 4, "sparse_training": 4, "lm": 4, "calibrated": 4,
    "imp": 5, "merging": 5, "criteria": 5, "analysis": 5,
    "lm_criteria": 6, "runs": 6,
}
PRUNING = {"masks", "patterns", "imp", "structured", "merging", "graph", "lrp", "criteria", "sparse_training",
           "calibrated", "analysis", "unit_criteria", "lm_criteria"}


def _top(name: str) -> str | None:
    """``jaxprune.lrp.rules`` → ``lrp``; a module outside the library → None."""
    parts = name.split(".")
    return parts[1] if parts[0] == "jaxprune" and len(parts) > 1 else None


def _imports(path: pathlib.Path) -> set[str]:
    """Every module name an ``import`` / ``from … import`` in ``path`` names (any depth, any scope), with
    ``from jaxprune import a, b`` read as ``jaxprune.a``, ``jaxprune.b``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "jaxprune":
                names.update(f"jaxprune.{a.name}" for a in node.names)
    return names


def _modules() -> dict[str, set[str]]:
    """``{top-level module: set of imported names}`` over every ``.py`` file under ``jaxprune/``."""
    out: dict[str, set[str]] = {}
    for path in sorted(LIB.rglob("*.py")):
        rel = path.relative_to(LIB)
        top = rel.parts[0].removesuffix(".py")
        if top == "__init__":
            continue
        out.setdefault(top, set()).update(_imports(path))
    return out


def test_every_library_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYERS))
    assert not missing, f"place these modules in tests/test_layering.py LAYERS (and docs/design.md): {missing}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_point_down_the_layers(module):
    if module not in LAYERS:
        pytest.skip("unplaced (test_every_library_module_has_a_layer fails)")
    upward = sorted(t for t in map(_top, _modules()[module])
                    if t is not None and t != module and LAYERS.get(t, 99) >= LAYERS[module])
    assert not upward, f"jaxprune.{module} (layer {LAYERS[module]}) imports {upward} of the same or a higher layer"


def test_the_library_never_imports_experiments_or_benchmarks():
    bad = {m: sorted(n for n in names if n.split(".")[0] in ("experiments", "benchmarks"))
           for m, names in _modules().items()}
    assert not {m: n for m, n in bad.items() if n}


def test_train_knows_nothing_about_pruning():
    assert not {_top(n) for n in _modules()["train"]} & PRUNING


def test_the_checker_sees_a_violation(tmp_path):
    """The AST reader finds imports inside functions and ``from jaxprune import x`` lists (the test can fail)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from jaxprune import imp, masks\n    import experiments.common\n")
    assert {"jaxprune.imp", "jaxprune.masks", "experiments.common"} <= _imports(src)
