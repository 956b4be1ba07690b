"""Orbax save/restore of experiment state.

Trees are stored as their flattened leaves (``{"00000": leaf, …}``) and rebuilt against a template of the same
structure, so any pytree — optax states with empty NamedTuples, masks of bools, PRNG keys — round-trips exactly.
Orbax writes to a temporary directory and renames it when complete, so a crash never leaves a half-written
checkpoint that looks finished. :func:`save` returns a sha256 of the leaves; :func:`restore` given it refuses a
checkpoint whose files were changed since (flipped bytes restore silently otherwise).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def _flat(tree: PyTree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))}


def _sha256(flat: dict[str, np.ndarray]) -> str:
    """sha256 over the leaves in key order: each leaf's key, dtype and shape, then its bytes (C order)."""
    h = hashlib.sha256()
    for k in sorted(flat):
        x = np.ascontiguousarray(flat[k])
        h.update(f"{k}:{x.dtype.str}:{x.shape};".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def save(path: str | os.PathLike, tree: PyTree) -> str:
    """Write ``tree`` to the directory ``path`` (must not exist yet); returns the sha256 of its leaves (hex), for
    :func:`restore` to check."""
    path = Path(path).absolute()
    flat = _flat(tree)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, flat)
        ckpt.wait_until_finished()
    return _sha256(flat)


def restore(path: str | os.PathLike, template: PyTree, sha256: str | None = None, hint: str = "") -> PyTree:
    """Read the tree saved at ``path``; ``template`` gives the structure, shapes and dtypes.

    ``sha256`` (what :func:`save` returned; None: unchecked): a ValueError if the restored leaves differ.
    ``hint``: appended to the error messages (what to do about a corrupt checkpoint)."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in _flat(template).items()}
    try:
        with ocp.StandardCheckpointer() as ckpt:
            loaded = ckpt.restore(path, abstract)
    except Exception as e:  # orbax/tensorstore errors on damaged files come in many types
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}){hint}") from e
    if len(loaded) != len(leaves):
        raise ValueError(f"checkpoint {path} holds {len(loaded)} leaves, the template {len(leaves)}{hint}")
    flat = {k: np.asarray(loaded[k]) for k in sorted(loaded)}
    if sha256 is not None and _sha256(flat) != sha256:
        raise ValueError(f"checkpoint {path}: its contents do not match the sha256 recorded when it was saved "
                         f"(a corrupt or changed file){hint}")
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in flat.values()])


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (temp file + rename): readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """The JSON value in ``path``; a corrupt or truncated file is a ValueError naming it (``hint`` appended)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON, the file is corrupt or truncated ({e}){hint}") from None


def as_stored(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples become lists, ...): settings are compared in the form they are stored."""
    return json.loads(json.dumps(obj))


def settings_diff(old: dict, new: dict, added_later: dict | None = None) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every setting that differs between a stored record ``old`` and the
    settings ``new`` (both as JSON holds them). ``added_later``: settings introduced after records were first
    written, with the value an older record that lacks them was made with (only keys of ``new`` are filled in)."""
    old, new = as_stored(old), as_stored(new)
    old.update(as_stored({k: v for k, v in (added_later or {}).items() if k not in old and k in new}))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def format_settings_diff(diff: dict[str, tuple]) -> str:
    """``"lr: 0.05 -> 0.5, training_steps: '5' -> '50'"`` (each differing setting, old value -> new value)."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))


def check_run_config(workdir: str | os.PathLike, record: dict, volatile: tuple = (),
                     added_later: dict | None = None, migrate: Callable[[dict], dict] | None = None) -> None:
    """Record a run's settings in ``workdir/config.json``, or refuse to resume a run made with other settings.

    ``volatile``: keys that may change between a run and its resumption (not recorded, not compared).
    ``added_later``: settings introduced after workdirs were first written, with the value an older
    ``config.json`` that lacks them ran with. ``migrate``: maps a stored record written under older setting names
    to the current ones before the comparison (the file itself is left as it is).
    """
    path = Path(workdir) / "config.json"
    # compared as JSON holds them (tuples become lists), so an identical Python config is not refused
    clean = as_stored({k: v for k, v in record.items() if k not in volatile})
    if not path.exists():
        write_json(path, clean)
        return
    stored = read_json(path)
    stored = migrate(stored) if migrate is not None else stored
    old = {k: v for k, v in stored.items() if k not in volatile}
    diff = settings_diff(old, clean, {k: v for k, v in (added_later or {}).items() if k not in volatile})
    if diff:
        raise ValueError(f"workdir {workdir} holds a run with a different config — different settings "
                         f"({format_settings_diff(diff)}); use a new --workdir or delete the old one")
