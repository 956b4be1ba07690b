"""Orbax save/restore of experiment state.

Trees are stored as their flattened leaves (``{"00000": leaf, …}``) and rebuilt against a template of the same
structure, so any pytree — optax states with empty NamedTuples, masks of bools, PRNG keys — round-trips exactly.
Orbax writes to a temporary directory and renames it when complete, so a crash never leaves a half-written
checkpoint that looks finished.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def _flat(tree: PyTree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def save(path: str | os.PathLike, tree: PyTree) -> None:
    """Write ``tree`` to the directory ``path`` (must not exist yet)."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, _flat(tree))
        ckpt.wait_until_finished()


def restore(path: str | os.PathLike, template: PyTree) -> PyTree:
    """Read the tree saved at ``path``; ``template`` gives the structure, shapes and dtypes."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in _flat(template).items()}
    with ocp.StandardCheckpointer() as ckpt:
        loaded = ckpt.restore(path, abstract)
    if len(loaded) != len(leaves):
        raise ValueError(f"checkpoint {path} holds {len(loaded)} leaves, the template {len(leaves)}")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(loaded[k]) for k in sorted(loaded)])


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def check_run_config(workdir: str | os.PathLike, record: dict, volatile: tuple = (),
                     added_later: dict | None = None) -> None:
    """Record a run's settings in ``workdir/config.json``, or refuse to resume a run made with other settings.

    ``volatile``: keys that may change between a run and its resumption (not recorded, not compared).
    ``added_later``: settings introduced after workdirs were first written, with the value an older
    ``config.json`` that lacks them ran with.
    """
    path = Path(workdir) / "config.json"
    clean = {k: v for k, v in record.items() if k not in volatile}
    if not path.exists():
        write_json(path, clean)
        return
    old = {k: v for k, v in read_json(path).items() if k not in volatile}
    old.update({k: v for k, v in (added_later or {}).items() if k not in old and k in clean})
    diff = {k: (old.get(k), clean.get(k)) for k in set(old) | set(clean) if old.get(k) != clean.get(k)}
    if diff:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"workdir {workdir} holds a run with a different config — different settings ({lines}); "
                         "use a new --workdir or delete the old one")
