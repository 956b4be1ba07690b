"""Mask pytrees over parameters: select prunable leaves, rank, prune, apply, report; the masked optimizer.

* A **mask** has the structure of the params; every leaf is a bool array of the leaf's shape (non-prunable
  leaves are all ``True``).
* A **prunable** tree has the same structure with Python ``bool`` leaves saying which leaves may be pruned.
* Pruning removes a *fraction of the remaining* prunable weights with exact counts: ``ceil(fraction · remaining)``
  (OpenLTH's rounding), either over all prunable leaves at once (``scope="global"``, raw scores compared across
  layers) or per leaf (``scope="layerwise"``). Ties are broken deterministically: among equal scores the weight
  that comes first in flattening order (leaf order, then row-major) is pruned first.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Array = jax.Array
SCOPES = ("global", "layerwise")


def path_str(path: tuple) -> str:
    """``(DictKey('dense_0'), DictKey('kernel'))`` → ``"dense_0/kernel"``."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def default_prunable(path: str, leaf: Array) -> bool:
    """Dense and conv kernels; not biases, BatchNorm scales/offsets or statistics."""
    return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) >= 2


def compile_patterns(exclude: Iterable[str]) -> list[re.Pattern]:
    """The ``exclude`` regexes compiled; a ValueError naming the one that is not a regular expression."""
    out = []
    for pattern in exclude:
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"exclude: {pattern!r} is not a regular expression ({e})") from None
    return out


def prunable_leaves(params: PyTree, predicate: Callable[[str, Array], bool] = default_prunable,
                    exclude: Iterable[str] = (), biases: bool = False) -> PyTree:
    """Tree of Python bools: ``predicate(path, leaf)`` and no ``exclude`` regex matches the path.

    ``exclude=("dense_2",)`` leaves the output layer of an MLP(300, 100, 10) unpruned; patterns are
    ``re.search``-ed against paths such as ``"dense_2/kernel"``. ``biases=True`` also makes the ``bias`` of every
    module whose ``kernel`` is prunable (chosen by ``predicate`` and not excluded) prunable, ranked with the
    weights as pruning code that selects parameters by layer name does; the bias of an excluded kernel, and
    BatchNorm offsets, which sit beside no kernel, stay unpruned.
    """
    pats = compile_patterns(exclude)
    excluded = lambda path: any(r.search(path) for r in pats)
    leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    # modules whose kernel is prunable (after ``exclude``): only their biases may be pruned with them
    with_kernel = {path.rpartition("/")[0] for path, x in leaves
                   if biases and path.endswith("/kernel") and predicate(path, x) and not excluded(path)}

    def prunable(path: str, leaf: Array) -> bool:
        head, _, name = path.rpartition("/")
        chosen = bool(predicate(path, leaf)) or (name == "bias" and head in with_kernel)
        return chosen and not excluded(path)

    tree = jax.tree_util.tree_map_with_path(lambda p, x: prunable(path_str(p), x), params)
    if not any(jax.tree_util.tree_leaves(tree)):
        raise ValueError(f"prunable_leaves: no leaf is prunable (exclude={list(exclude)}); "
                         f"paths are {[path for path, _ in leaves]}")
    return tree


def ones_like(params: PyTree) -> PyTree:
    """The dense mask."""
    return jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), params)


def check_trees(params: PyTree | None = None, mask: PyTree | None = None, prunable: PyTree | None = None, *,
                params_name: str = "params") -> None:
    """Refuse trees that do not belong together: a ValueError naming the argument and the offending leaf path.

    Pass the trees a function takes (``None``: not given); the first one given is the reference structure.
    ``params`` (named ``params_name``, e.g. ``"scores"``): array leaves. ``mask``: the same structure, bool leaves
    of the params' shapes. ``prunable``: the same structure, Python-bool leaves, at least one ``True``. Only static
    properties (tree structure, shapes, dtypes) are read, so this is safe on traced values inside ``jit``/``vmap``.
    """
    given = [(n, t) for n, t in ((params_name, params), ("mask", mask), ("prunable", prunable)) if t is not None]
    ref_name, ref = given[0]
    for name, tree in given[1:]:
        _check_structure(ref_name, ref, name, tree)
    if mask is not None:
        for path, m in jax.tree_util.tree_leaves_with_path(mask):
            dtype = getattr(m, "dtype", None) or np.asarray(m).dtype
            if dtype != bool:
                raise ValueError(f"mask: leaf {path_str(path)!r} has dtype {dtype}; expected bool (True = kept)")
        if params is not None:
            for (path, p), m in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(mask)):
                if np.shape(m) != np.shape(p):
                    raise ValueError(f"mask: leaf {path_str(path)!r} has shape {np.shape(m)}; expected "
                                     f"{np.shape(p)}, the shape of that leaf of {params_name}")
    if prunable is not None:
        flags = jax.tree_util.tree_leaves_with_path(prunable)
        for path, p in flags:
            if not isinstance(p, (bool, np.bool_)):
                raise ValueError(f"prunable: leaf {path_str(path)!r} has type {type(p).__name__}; expected a "
                                 "Python bool per leaf (see prunable_leaves)")
        if not any(p for _, p in flags):
            raise ValueError(f"prunable: no leaf is prunable (paths {[path_str(q) for q, _ in flags]}); expected "
                             "at least one True leaf (see prunable_leaves)")


def _check_structure(ref_name: str, ref: PyTree, name: str, tree: PyTree) -> None:
    a, b = jax.tree_util.tree_structure(ref), jax.tree_util.tree_structure(tree)
    if a == b:
        return
    pa = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(ref)]
    pb = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    missing = [p for p in pa if p not in set(pb)]
    extra = [p for p in pb if p not in set(pa)]
    if missing:
        raise ValueError(f"{name}: has no leaf {missing[0]!r}; expected the structure of {ref_name} "
                         f"(leaves {pa})")
    if extra:
        raise ValueError(f"{name}: leaf {extra[0]!r} is not in {ref_name}; expected the structure of {ref_name} "
                         f"(leaves {pa})")
    raise ValueError(f"{name}: the leaf paths of {ref_name} but other containers ({b}); expected {a}")


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """Zero the pruned weights (keeps dtypes). ``mask``: bool leaves of the params' shapes."""
    check_trees(params, mask)
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def _check(fraction: float, scope: str) -> None:
    if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
        raise ValueError(f"fraction={fraction}: expected a fraction of the remaining weights in [0, 1]")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: expected one of {SCOPES}")


def prune_by_score(scores: PyTree, mask: PyTree, prunable: PyTree, fraction: float,
                   scope: str = "global") -> PyTree:
    """Remove the ``ceil(fraction · remaining)`` surviving prunable weights with the lowest ``scores``.

    ``scores``: finite values, ``mask``: bools, both shaped like the params. Returns the new mask; non-prunable
    leaves unchanged.
    """
    check_trees(scores, mask, prunable, params_name="scores")
    return _prune(scores, mask, prunable, fraction, scope, "scores")


def _prune(scores: PyTree, mask: PyTree, prunable: PyTree, fraction: float, scope: str, name: str) -> PyTree:
    """:func:`prune_by_score` on checked trees; ``name``: what the scores are called in errors."""
    _check(fraction, scope)
    s_leaves, treedef = jax.tree_util.tree_flatten(scores)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(scores)]
    m_leaves = treedef.flatten_up_to(mask)
    p_leaves = treedef.flatten_up_to(prunable)
    out = list(m_leaves)
    idx = [i for i, p in enumerate(p_leaves) if p]
    if scope == "global":
        groups = [idx]
    else:
        groups = [[i] for i in idx]
    for group in groups:
        # Host-side numpy: one sort per level, no per-shape XLA compilation.
        flat_m = np.concatenate([np.asarray(m_leaves[i], bool).ravel() for i in group])
        flat_s = np.concatenate([np.asarray(s_leaves[i], np.float64).ravel() for i in group])
        if not np.isfinite(flat_s[flat_m]).all():  # name the first leaf at fault
            for i in group:
                bad = int(np.sum(~np.isfinite(np.asarray(s_leaves[i], np.float64)[np.asarray(m_leaves[i], bool)])))
                if bad:
                    raise ValueError(f"{name}: {bad} NaN or ±Inf values among the surviving weights of "
                                     f"{paths[i]!r}; expected finite values to rank (did training diverge?)")
        remaining = int(flat_m.sum())
        k = math.ceil(fraction * remaining - 1e-9)
        if k == 0:
            continue
        # Survivors first, then by score; already-pruned weights rank last whatever their score, so they are never
        # chosen again. lexsort is stable: among equal scores the flattening order decides.
        order = np.lexsort((flat_s, ~flat_m))
        flat_m = flat_m.copy()
        flat_m[order[:k]] = False
        offset = 0
        for i in group:
            size = int(np.prod(np.shape(m_leaves[i])))
            out[i] = jnp.asarray(flat_m[offset:offset + size].reshape(np.shape(m_leaves[i])))
            offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


def magnitude_prune(params: PyTree, mask: PyTree, prunable: PyTree, fraction: float,
                    scope: str = "global") -> PyTree:
    """Prune the smallest-|w| ``fraction`` of the remaining prunable weights (OpenLTH ``sparse_global``)."""
    check_trees(params, mask, prunable)
    return _prune(jax.tree_util.tree_map(jnp.abs, params), mask, prunable, fraction, scope, "params")


def random_prune(key: Array, mask: PyTree, prunable: PyTree, fraction: float, scope: str = "global") -> PyTree:
    """Prune a uniformly random ``fraction`` of the remaining prunable weights."""
    check_trees(mask=mask, prunable=prunable)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    keys = jax.random.split(key, len(leaves))
    scores = treedef.unflatten([jax.random.uniform(k, jnp.shape(m)) for k, m in zip(keys, leaves)])
    return _prune(scores, mask, prunable, fraction, scope, "scores")


def random_like(key: Array, mask: PyTree, prunable: PyTree) -> PyTree:
    """A random mask with exactly the same number of kept weights in every prunable leaf (control branch)."""
    check_trees(mask=mask, prunable=prunable)
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    p_leaves = treedef.flatten_up_to(prunable)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, m, p in zip(keys, leaves, p_leaves):
        if not p:
            out.append(m)
            continue
        keep = int(np.sum(m))
        order = np.argsort(np.asarray(jax.random.uniform(k, (m.size,))), kind="stable")
        flat = np.zeros((m.size,), bool)
        flat[order[:keep]] = True
        out.append(jnp.asarray(flat.reshape(m.shape)))
    return treedef.unflatten(out)


def density_report(mask: PyTree, prunable: PyTree) -> dict:
    """``{"density": overall kept fraction of prunable weights, "kept": int, "total": int,
    "layers": {path: density}}`` (only prunable leaves)."""
    check_trees(mask=mask, prunable=prunable)
    layers, kept, total = {}, 0, 0
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(mask),
                            jax.tree_util.tree_leaves(prunable)):
        if not p:
            continue
        k = int(np.sum(m))
        layers[path_str(path)] = k / m.size
        kept += k
        total += m.size
    return {"density": kept / total, "kept": kept, "total": total, "layers": layers}


# ----------------------------------------------------------------------------------------------- optimizer
class MaskedState(NamedTuple):
    mask: PyTree  # bool tree like the params
    inner: PyTree


def masked(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap ``inner`` so pruned weights never move: gradients are masked before ``inner`` (so its moments stay
    zero there) and updates after it (so weight decay and the like cannot leak). The mask lives in the state
    (``MaskedState.mask``, dense after ``init``); set it with :func:`with_mask`. Keeping it in the state lets one
    compiled train step serve every pruning level.
    """

    def init(params):
        return MaskedState(ones_like(params), inner.init(params))

    def update(updates, state, params=None):
        zero = lambda u, m: jnp.where(m, u, jnp.zeros_like(u))
        updates = jax.tree_util.tree_map(zero, updates, state.mask)
        updates, new_inner = inner.update(updates, state.inner, params)
        updates = jax.tree_util.tree_map(zero, updates, state.mask)
        return updates, MaskedState(state.mask, new_inner)

    return optax.GradientTransformation(init, update)


def with_mask(tx: optax.GradientTransformation, state: MaskedState, mask: PyTree) -> MaskedState:
    """Install ``mask`` in a :func:`masked` optimizer's state and zero the param-shaped moments it prunes."""
    if not isinstance(state, MaskedState):
        raise TypeError(f"state: expected the state of jaxprune.masks.masked(...), got {type(state).__name__}")
    check_trees(state.mask, mask)  # the state's mask has the params' structure and shapes
    inner_tx = _inner_of(tx)
    zeroed = optax.tree_utils.tree_map_params(
        inner_tx, lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), state.inner, mask,
        transform_non_params=lambda x: x)
    return MaskedState(jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), mask), zeroed)


def _inner_of(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    # tree_map_params only needs ``init`` to learn which state leaves are param-shaped.
    return optax.GradientTransformation(lambda p: tx.init(p).inner, None)
