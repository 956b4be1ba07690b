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
    module whose ``kernel`` is prunable prunable (ranked with the weights, as pruning code that selects parameters
    by layer name does); BatchNorm offsets, which sit beside no kernel, stay unpruned.
    """
    pats = compile_patterns(exclude)
    leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    with_kernel = {path.rpartition("/")[0] for path, x in leaves
                   if biases and path.endswith("/kernel") and predicate(path, x)}

    def prunable(path: str, leaf: Array) -> bool:
        head, _, name = path.rpartition("/")
        chosen = bool(predicate(path, leaf)) or (name == "bias" and head in with_kernel)
        return chosen and not any(r.search(path) for r in pats)

    tree = jax.tree_util.tree_map_with_path(lambda p, x: prunable(path_str(p), x), params)
    if not any(jax.tree_util.tree_leaves(tree)):
        raise ValueError(f"prunable_leaves: no leaf is prunable (exclude={list(exclude)}); "
                         f"paths are {[path for path, _ in leaves]}")
    return tree


def ones_like(params: PyTree) -> PyTree:
    """The dense mask."""
    return jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), params)


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """Zero the pruned weights (keeps dtypes)."""
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def _check(fraction: float, scope: str) -> None:
    if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
        raise ValueError(f"fraction={fraction}: expected a fraction of the remaining weights in [0, 1]")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: expected one of {SCOPES}")


def prune_by_score(scores: PyTree, mask: PyTree, prunable: PyTree, fraction: float,
                   scope: str = "global") -> PyTree:
    """Remove the ``ceil(fraction · remaining)`` surviving prunable weights with the lowest ``scores``.

    ``scores``, ``mask``: trees shaped like the params. Returns the new mask; non-prunable leaves unchanged.
    """
    _check(fraction, scope)
    s_leaves, treedef = jax.tree_util.tree_flatten(scores)
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
        if np.isnan(flat_s[flat_m]).any():
            raise ValueError("scores: NaN among the surviving weights; cannot rank them")
        remaining = int(flat_m.sum())
        k = math.ceil(fraction * remaining - 1e-9)
        if k == 0:
            continue
        # Already-pruned weights rank last so they are never chosen again; stable sort = index tie-break.
        order = np.argsort(np.where(flat_m, flat_s, np.inf), kind="stable")
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
    return prune_by_score(jax.tree_util.tree_map(jnp.abs, params), mask, prunable, fraction, scope)


def random_prune(key: Array, mask: PyTree, prunable: PyTree, fraction: float, scope: str = "global") -> PyTree:
    """Prune a uniformly random ``fraction`` of the remaining prunable weights."""
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    keys = jax.random.split(key, len(leaves))
    scores = treedef.unflatten([jax.random.uniform(k, jnp.shape(m)) for k, m in zip(keys, leaves)])
    return prune_by_score(scores, mask, prunable, fraction, scope)


def random_like(key: Array, mask: PyTree, prunable: PyTree) -> PyTree:
    """A random mask with exactly the same number of kept weights in every prunable leaf (control branch)."""
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
    layers, kept, total = {}, 0, 0
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(mask),
                            jax.tree_util.tree_leaves(prunable)):
        if not p:
            continue
        k = int(np.sum(m))
        layers[path_str(path)] = k / m.size
        kept += k
        total += m.size
    return {"density": kept / total if total else 1.0, "kept": kept, "total": total, "layers": layers}


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
    inner_tx = _inner_of(tx)
    zeroed = optax.tree_utils.tree_map_params(
        inner_tx, lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), state.inner, mask,
        transform_non_params=lambda x: x)
    return MaskedState(jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), mask), zeroed)


def _inner_of(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    # tree_map_params only needs ``init`` to learn which state leaves are param-shaped.
    return optax.GradientTransformation(lambda p: tx.init(p).inner, None)
