"""Sparsity patterns: which sets of weights a mask may remove together. Unstructured, N:M and blocks; a registry.

* **N:M** (:func:`nm_mask`): in every group of ``m`` consecutive entries along ``axis`` the ``n`` highest scores are
  kept, exactly ``n`` per group. ``axis=-2`` is the input-feature axis of Flax dense ``(in, out)`` and conv
  ``(h, w, in, out)`` kernels, the axis sparse tensor cores group (NVIDIA 2:4 groups along the reduction axis).
* **Blocks** (:func:`block_mask`): blocks of shape ``block`` tile the leaf; a block's score is the sum of its
  entries' scores; the lowest ``ceil(fraction · n_blocks)`` blocks are pruned (``conventions.n_to_prune``).
* **Ties** (``jaxprune.conventions``): among equal scores the earlier entry (along the N:M axis; in row-major order
  of the block grid; in row-major order of the leaf for unstructured) is kept, the later pruned first. ``-inf``
  ranks below every finite score, so weights given ``-inf`` (already pruned) are never kept in place of finite
  ones; NaN is refused on concrete arrays (ValueError) and, traced, ranks above ``+inf`` as in ``jaxprune.masks``.
* Every pattern is a registry entry (:data:`PATTERNS`, :func:`register_pattern`): a class with static methods
  ``check(shape, **options)`` (ValueError for a leaf the pattern cannot tile), ``units(shape, **options)`` (what a
  sparsity fraction counts: weights, blocks, entries of one group), ``most(shape, **options)`` (the most units that
  may go), ``select(scores, pruned, **options)`` (jittable keep mask with ``pruned`` units removed; ``pruned`` may
  be a traced int) and ``conforms(mask, **options)`` (does a concrete mask have the pattern). :func:`prune` and
  the training-time sparsity of ``jaxprune.sparse_training`` use only these, so a new pattern is one entry.
* Tree level (:func:`prune`, :func:`nm_prune`, :func:`block_prune`) follows ``jaxprune.masks``: ``(scores, mask,
  prunable)`` trees; non-prunable leaves keep their mask; masked-out weights stay pruned (their score is ``-inf``).
  Sparsities here are of the whole leaf (the target), not of the remaining weights as in ``masks.prune_by_score``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import conventions, masks

PyTree = Any
Array = jax.Array
PATTERNS: dict[str, type] = {}

__all__ = ["PATTERNS", "register_pattern", "get", "nm_mask", "block_mask", "prune", "nm_prune", "block_prune",
           "prune_counts", "pruned_count", "report", "describe"]


def register_pattern(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_pattern("n:m")`` puts the pattern in :data:`PATTERNS` under ``name``."""

    def deco(cls: type) -> type:
        for attr in ("check", "units", "most", "select", "conforms"):
            if not callable(getattr(cls, attr, None)):
                raise TypeError(f"register_pattern({name!r}): {cls.__name__} has no {attr}(...)")
        PATTERNS[name] = cls
        return cls

    return deco


def get(name: str) -> type:
    """The registered pattern ``name``; a ValueError listing the registered ones otherwise."""
    if name not in PATTERNS:
        raise ValueError(f"pattern={name!r}: expected one of {sorted(PATTERNS)}")
    return PATTERNS[name]


def _keys(scores: Array) -> Array:
    """Unsigned keys ordered as ``scores`` (``masks._order_keys``: -0 = +0, NaN above +inf), same shape."""
    return masks._order_keys(jnp.ravel(scores)).reshape(jnp.shape(scores))


def _lowest_out(scores: Array, pruned: Array | int) -> Array:
    """Keep mask of a flat ``scores: (n,)`` with its ``pruned`` lowest removed, ties: the later goes first."""
    flat = jnp.ravel(scores)
    return masks._prune_lowest(jnp.ones(flat.shape, bool), flat, jnp.asarray(pruned, jnp.int32))


def _refuse_nan(scores: Array, name: str = "scores") -> None:
    if not isinstance(scores, jax.core.Tracer) and bool(jnp.isnan(scores).any()):
        raise ValueError(f"{name}: {int(jnp.isnan(scores).sum())} NaN values; expected scores to rank (finite, "
                         "or -inf for weights that must stay pruned)")


# ------------------------------------------------------------------------------------------------ patterns
@register_pattern("unstructured")
class Unstructured:
    """Any weights: a sparsity fraction counts the leaf's weights; the lowest scores go (ties: row-major later)."""

    @staticmethod
    def check(shape: tuple, **options) -> None:
        if options:
            raise ValueError(f"pattern 'unstructured' takes no options; got {sorted(options)}")

    @staticmethod
    def units(shape: tuple) -> int:
        return math.prod(shape)

    @staticmethod
    def most(shape: tuple) -> int:
        return math.prod(shape)

    @staticmethod
    def select(scores: Array, pruned: Array | int) -> Array:
        return _lowest_out(scores, pruned).reshape(jnp.shape(scores))

    @staticmethod
    def conforms(mask: Array) -> bool:
        return True


@register_pattern("n:m")
class NM:
    """At most ``n`` of every ``m`` consecutive entries along ``axis`` kept; a fraction counts entries per group
    (``ceil(s · m)`` pruned in each, at most ``m − n``): sparsity ``1 − n/m`` is exactly ``n:m``, lower
    sparsities give ``(m − k):m`` on the way (gradual pruning into ``n:m``)."""

    @staticmethod
    def check(shape: tuple, n: int, m: int, axis: int = -2) -> None:
        if not (isinstance(m, (int, np.integer)) and m >= 1):
            raise ValueError(f"m={m!r}: expected a group size, an int >= 1")
        if not (isinstance(n, (int, np.integer)) and 0 <= n <= m):
            raise ValueError(f"n={n!r}: expected an int in [0, m={m}] (kept per group)")
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis={axis}: out of range for a leaf of shape {tuple(shape)}")
        if shape[axis] % m:
            raise ValueError(f"m={m}: the axis length {shape[axis]} (axis={axis} of shape {tuple(shape)}) is not "
                             f"divisible by m")

    @staticmethod
    def units(shape: tuple, n: int, m: int, axis: int = -2) -> int:
        return m

    @staticmethod
    def most(shape: tuple, n: int, m: int, axis: int = -2) -> int:
        return m - n

    @staticmethod
    def select(scores: Array, pruned: Array | int, n: int, m: int, axis: int = -2) -> Array:
        """Keep mask: the ``m − pruned`` highest of each group. An entry's rank in its group is the number of
        higher entries plus the equal ones before it; ranks are a permutation of ``0..m-1``, so exact."""
        s = jnp.moveaxis(scores, axis, -1)
        g = _keys(s).reshape(s.shape[:-1] + (s.shape[-1] // m, m))
        higher = jnp.sum(g[..., None, :] > g[..., :, None], axis=-1, dtype=jnp.int32)
        before = jnp.tril(jnp.ones((m, m), bool), -1)  # before[i, j]: j < i
        tied = jnp.sum((g[..., None, :] == g[..., :, None]) & before, axis=-1, dtype=jnp.int32)
        keep = (higher + tied) < (m - jnp.asarray(pruned, jnp.int32))
        return jnp.moveaxis(keep.reshape(s.shape), -1, axis)

    @staticmethod
    def conforms(mask: Array, n: int, m: int, axis: int = -2) -> bool:
        k = np.moveaxis(np.asarray(mask, bool), axis, -1)
        return bool((k.reshape(k.shape[:-1] + (-1, m)).sum(-1) <= n).all())


@register_pattern("block")
class Block:
    """Blocks of shape ``block`` (one entry per leaf dimension) tiling the leaf, all kept or all pruned; a block
    scores the sum of its entries (``-inf`` if any entry is ``-inf``: a block with a pruned weight goes first)."""

    @staticmethod
    def check(shape: tuple, block: tuple) -> None:
        block = tuple(block)
        if len(block) != len(shape) or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in block):
            raise ValueError(f"block={block}: expected {len(shape)} positive ints, one per dimension of the leaf "
                             f"shape {tuple(shape)}")
        if any(d % b for d, b in zip(shape, block)):
            raise ValueError(f"block={block}: does not tile the leaf shape {tuple(shape)} (each dimension must be "
                             "divisible by the block's)")

    @staticmethod
    def units(shape: tuple, block: tuple) -> int:
        return math.prod(d // b for d, b in zip(shape, block))

    @staticmethod
    def most(shape: tuple, block: tuple) -> int:
        return Block.units(shape, block)

    @staticmethod
    def select(scores: Array, pruned: Array | int, block: tuple) -> Array:
        shape = jnp.shape(scores)
        split = tuple(x for d, b in zip(shape, block) for x in (d // b, b))
        inner = tuple(range(1, 2 * len(shape), 2))
        s = scores.reshape(split)
        dead = jnp.any(jnp.isneginf(s), axis=inner)
        total = jnp.where(dead, -jnp.inf, jnp.sum(jnp.where(jnp.isneginf(s), 0, s), axis=inner))
        keep = _lowest_out(total, pruned).reshape(total.shape)
        keep = jnp.expand_dims(keep, inner)
        return jnp.broadcast_to(keep, split).reshape(shape)

    @staticmethod
    def conforms(mask: Array, block: tuple) -> bool:
        k = np.asarray(mask, bool)
        split = tuple(x for d, b in zip(k.shape, block) for x in (d // b, b))
        inner = tuple(range(1, 2 * k.ndim, 2))
        k = k.reshape(split)
        return bool((k.all(axis=inner) | ~k.any(axis=inner)).all())


# ----------------------------------------------------------------------------------------------- one leaf
def pruned_count(pattern: str, sparsity: float, shape: tuple, **options) -> int:
    """Units of a leaf of ``shape`` that ``sparsity`` (a fraction of the leaf, in [0, 1]) prunes under ``pattern``:
    ``min(ceil(sparsity · units), most)`` in float64 (house rounding). Checks ``options`` against ``shape``."""
    p = get(pattern)
    p.check(tuple(shape), **options)
    return min(int(conventions.n_to_prune(sparsity, p.units(tuple(shape), **options))),
               p.most(tuple(shape), **options))


def nm_mask(scores: Array, n: int, m: int, axis: int = -2) -> Array:
    """Keep mask ``(scores' shape) bool``: the ``n`` highest scores of every group of ``m`` consecutive entries
    along ``axis`` (ties: the earlier entry kept). Jittable with ``n, m, axis`` static. ``axis`` length not divisible
    by ``m`` → ValueError naming ``m``."""
    NM.check(jnp.shape(scores), n=n, m=m, axis=axis)
    _refuse_nan(scores)
    return NM.select(scores, m - n, n=n, m=m, axis=axis)


def block_mask(scores: Array, block: tuple[int, ...], fraction: float) -> Array:
    """Keep mask ``(scores' shape) bool``: blocks of shape ``block`` scored by their sums, the lowest
    ``ceil(fraction · n_blocks)`` pruned (ties: the later block in row-major order of the block grid goes first).
    Jittable with ``block, fraction`` static."""
    Block.check(jnp.shape(scores), block=tuple(block))
    _refuse_nan(scores)
    k = pruned_count("block", fraction, jnp.shape(scores), block=tuple(block))
    return Block.select(scores, k, block=tuple(block))


# ------------------------------------------------------------------------------------------------ trees
def prune(scores: PyTree, mask: PyTree, prunable: PyTree, sparsity: float, pattern: str = "unstructured",
          options: dict | None = None) -> PyTree:
    """New mask: every prunable leaf pruned to ``sparsity`` (fraction of the leaf, per leaf) under ``pattern``
    with its ``options`` (``{"n": 2, "m": 4}``, ``{"block": (4, 4)}``), scored by ``scores``; weights that
    ``mask`` already prunes score ``-inf`` and stay pruned. Jittable (close over all but ``scores``, ``mask``)."""
    masks.check_trees(scores, mask, prunable, params_name="scores")
    options = dict(options or {})
    counts = []
    for (path, s), m, p in zip(jax.tree_util.tree_leaves_with_path(scores), jax.tree_util.tree_leaves(mask),
                               jax.tree_util.tree_leaves(prunable)):
        if p:
            try:
                counts.append(pruned_count(pattern, sparsity, jnp.shape(s), **options))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{masks.path_str(path)}: {e}") from None
            _refuse_nan(jnp.where(m, s, 0), f"scores of {masks.path_str(path)!r}")
    return prune_counts(scores, mask, prunable, counts, pattern, options)


def prune_counts(scores: PyTree, mask: PyTree, prunable: PyTree, counts: Sequence[int | Array], pattern: str,
                 options: dict | None = None) -> PyTree:
    """The core of :func:`prune`: ``counts[j]`` units pruned in the ``j``-th prunable leaf (flattening order;
    ints or traced ints, e.g. looked up in a schedule's table under ``jit``), already-pruned weights first."""
    select = functools.partial(get(pattern).select, **dict(options or {}))
    counts = iter(counts)
    out = [m & select(jnp.where(m, s, -jnp.inf), next(counts)) if p else m
           for s, m, p in zip(jax.tree_util.tree_leaves(scores), jax.tree_util.tree_leaves(mask),
                              jax.tree_util.tree_leaves(prunable))]
    return jax.tree_util.tree_structure(scores).unflatten(out)


def nm_prune(scores: PyTree, mask: PyTree, prunable: PyTree, n: int, m: int, axis: int = -2) -> PyTree:
    """Every prunable leaf to ``n:m`` along ``axis`` (:func:`nm_mask` on the survivors' scores, AND ``mask``)."""
    return prune(scores, mask, prunable, 1.0, "n:m", {"n": n, "m": m, "axis": axis})


def block_prune(scores: PyTree, mask: PyTree, prunable: PyTree, block: tuple[int, ...], fraction: float) -> PyTree:
    """Every prunable leaf with ``ceil(fraction · n_blocks)`` of its blocks pruned (:func:`block_mask`; blocks
    holding an already-pruned weight go first)."""
    return prune(scores, mask, prunable, fraction, "block", {"block": tuple(block)})


# ---------------------------------------------------------------------------------------------- reports
def describe(pattern: str, options: dict | None = None) -> str:
    """``"2:4 (axis -2)"``, ``"block 4x4"``, ``"unstructured"``: the pattern as reports and plots name it."""
    o = dict(options or {})
    if pattern == "n:m":
        return f"{o['n']}:{o['m']} (axis {o.get('axis', -2)})"
    if pattern == "block":
        return "block " + "x".join(str(b) for b in o["block"])
    return pattern if not o else f"{pattern} {o}"


def report(mask: PyTree, prunable: PyTree, pattern: str = "unstructured", options: dict | None = None) -> dict:
    """``masks.density_report`` plus ``"pattern"`` (:func:`describe`) and ``"conforms"``: ``{path: bool}``, does
    each prunable leaf have the pattern (``2:4``: at most 2 kept per group)."""
    rep = masks.density_report(mask, prunable)
    options = dict(options or {})
    p = get(pattern)
    conforms = {}
    for (path, m), pr in zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree_util.tree_leaves(prunable)):
        if pr:
            p.check(np.shape(m), **options)
            conforms[masks.path_str(path)] = p.conforms(np.asarray(m), **options)
    return {**rep, "pattern": describe(pattern, options), "conforms": conforms}
