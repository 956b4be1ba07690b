"""jaxprune.patterns: N:M and block masks exact against slow numpy references (ties and -inf included), jit ==
eager, tree helpers, the registry and the pattern report."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import masks, patterns

# few distinct values so that ties are common; -inf marks weights that must stay pruned
VALUES = st.sampled_from([-np.inf, -1.0, 0.0, 0.0, 0.5, 1.0, 2.0])


def _nm_reference(s: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Loop over groups: order each by (score descending, position ascending), keep the first n."""
    s = np.moveaxis(s, axis, -1)
    keep = np.zeros(s.shape, bool)
    for idx in np.ndindex(s.shape[:-1]):
        for g in range(s.shape[-1] // m):
            pos = list(range(g * m, (g + 1) * m))
            order = sorted(pos, key=lambda j: (-s[idx][j], j))
            for j in order[:n]:
                keep[idx + (j,)] = True
    return np.moveaxis(keep, -1, axis)


def _block_reference(s: np.ndarray, block: tuple, k: int) -> np.ndarray:
    """Enumerate blocks in row-major order of the grid; sum each; prune the k lowest (later block first)."""
    grid = [d // b for d, b in zip(s.shape, block)]
    blocks = list(np.ndindex(*grid))
    sums = []
    for bi in blocks:
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(bi, block))
        sums.append(float(np.sum(s[sl])))
    order = sorted(range(len(blocks)), key=lambda j: (sums[j], -j))
    keep = np.ones(s.shape, bool)
    for j in order[:k]:
        keep[tuple(slice(i * b, (i + 1) * b) for i, b in zip(blocks[j], block))] = False
    return keep


@st.composite
def _nm_case(draw):
    m = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(0, m))
    ndim = draw(st.integers(2, 4))
    axis = draw(st.sampled_from([-2, -1, 0]))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] = m * draw(st.integers(1, 3))
    flat = draw(st.lists(VALUES, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.asarray(flat, np.float32).reshape(shape), n, m, axis


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@settings(max_examples=20, deadline=None)
@given(_nm_case())
def test_nm_mask_exact_with_ties_and_neg_inf(case):
    s, n, m, axis = case
    ref = _nm_reference(s, n, m, axis)
    got = np.asarray(patterns.nm_mask(jnp.asarray(s), n, m, axis))
    np.testing.assert_array_equal(got, ref)
    jitted = jax.jit(patterns.nm_mask, static_argnums=(1, 2, 3))(jnp.asarray(s), n, m, axis)
    np.testing.assert_array_equal(np.asarray(jitted), ref)
    # exactly n kept in every group, and no -inf kept while a finite score of its group was dropped
    g = np.moveaxis(got, axis, -1).reshape(-1, m)
    assert (g.sum(-1) == n).all()
    sg = np.moveaxis(s, axis, -1).reshape(-1, m)
    for keep, row in zip(g, sg):
        if (keep & np.isneginf(row)).any():
            assert not (~keep & np.isfinite(row)).any()


def test_nm_2of4_by_hand_and_ties():
    # axis -2 of a (8, 1) kernel: groups rows 0-3 and 4-7
    s = jnp.array([[3.0], [1.0], [2.0], [0.0], [1.0], [1.0], [1.0], [1.0]])
    np.testing.assert_array_equal(patterns.nm_mask(s, 2, 4)[:, 0],
                                  [True, False, True, False, True, True, False, False])
    with pytest.raises(ValueError, match="m=4.*axis length 6"):
        patterns.nm_mask(jnp.ones((6, 3)), 2, 4)
    with pytest.raises(ValueError, match="n=5"):
        patterns.nm_mask(jnp.ones((8, 3)), 5, 4)
    with pytest.raises(ValueError, match="NaN"):
        patterns.nm_mask(jnp.array([[jnp.nan], [1.0]]), 1, 2)


@st.composite
def _block_case(draw):
    ndim = draw(st.integers(1, 3))
    block = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    shape = tuple(b * draw(st.integers(1, 3)) for b in block)
    flat = draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), min_size=int(np.prod(shape)),
                         max_size=int(np.prod(shape))))
    return np.asarray(flat, np.float32).reshape(shape), block, draw(st.floats(0.0, 1.0))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@settings(max_examples=20, deadline=None)
@given(_block_case())
def test_block_mask_exact_with_ties(case):
    s, block, fraction = case
    n_blocks = int(np.prod([d // b for d, b in zip(s.shape, block)]))
    k = int(np.ceil(np.float64(fraction) * n_blocks - 1e-9))
    ref = _block_reference(s, block, k)
    np.testing.assert_array_equal(np.asarray(patterns.block_mask(jnp.asarray(s), block, fraction)), ref)
    jitted = jax.jit(patterns.block_mask, static_argnums=(1, 2))(jnp.asarray(s), block, fraction)
    np.testing.assert_array_equal(np.asarray(jitted), ref)
    assert int((~ref).sum()) == k * int(np.prod(block))


def test_block_mask_rounding_and_errors():
    s = jnp.arange(16.0).reshape(4, 4)
    keep = patterns.block_mask(s, (2, 2), 0.3)  # ceil(0.3 · 4) = 2 blocks: sums 10, 18, 42, 50
    np.testing.assert_array_equal(keep, np.repeat(np.repeat([[False, False], [True, True]], 2, 0), 2, 1))
    with pytest.raises(ValueError, match="block=.*tile"):
        patterns.block_mask(s, (3, 2), 0.5)
    with pytest.raises(ValueError, match="block=.*2 positive ints"):
        patterns.block_mask(s, (2,), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        patterns.block_mask(s, (2, 2), 1.5)


def _tree(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"enc": {"w": jax.random.normal(k1, (8, 6)), "b": jnp.ones(6)},
            "conv": {"w": jax.random.normal(k2, (3, 3, 4, 2))}}


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([(1, 2), (2, 4), (1, 4)]))
def test_nm_prune_tree_keeps_pruned_pruned(seed, nm):
    n, m = nm
    p = _tree(seed)
    pr = masks.prunable_leaves(p)
    start = masks.random_prune(jax.random.PRNGKey(seed + 1), masks.ones_like(p), pr, 0.3)
    scores = jax.tree_util.tree_map(jnp.abs, p)
    out = patterns.nm_prune(scores, start, pr, n, m)
    jitted = jax.jit(lambda s, mk: patterns.nm_prune(s, mk, pr, n, m))(scores, start)
    for path in (("enc", "w"), ("conv", "w")):
        o, st_, s = (t[path[0]][path[1]] for t in (out, start, scores))
        ref = np.asarray(st_) & _nm_reference(np.where(st_, s, -np.inf), n, m, -2)
        np.testing.assert_array_equal(np.asarray(o), ref)
        np.testing.assert_array_equal(np.asarray(jitted[path[0]][path[1]]), ref)
    assert bool(out["enc"]["b"].all())  # not prunable: unchanged
    rep = patterns.report(out, pr, "n:m", {"n": n, "m": m})
    assert rep["pattern"] == f"{n}:{m} (axis -2)" and all(rep["conforms"].values())


def test_block_prune_and_registry():
    p = _tree(0)
    pr = masks.prunable_leaves(p, exclude=("conv",))
    out = patterns.block_prune(jax.tree_util.tree_map(jnp.abs, p), masks.ones_like(p), pr, (2, 3), 0.5)
    assert int(out["enc"]["w"].sum()) == 24 and bool(out["conv"]["w"].all())
    rep = patterns.report(out, pr, "block", {"block": (2, 3)})
    assert rep["pattern"] == "block 2x3" and rep["conforms"] == {"enc/w": True} and rep["density"] == 0.5
    assert not patterns.report(masks.random_prune(jax.random.PRNGKey(0), masks.ones_like(p), pr, 0.5), pr,
                               "block", {"block": (2, 3)})["conforms"]["enc/w"]
    assert {"unstructured", "n:m", "block"} <= set(patterns.PATTERNS)
    with pytest.raises(ValueError, match="pattern='diag'"):
        patterns.prune(p, masks.ones_like(p), pr, 0.5, "diag")
    with pytest.raises(ValueError, match="enc/w: m=4: the axis length 6"):
        patterns.nm_prune(p, masks.ones_like(p), masks.prunable_leaves(p, exclude=("conv",)), 2, 4, axis=-1)


def test_unstructured_prune_matches_masks_layerwise():
    """From a dense mask, pattern "unstructured" at sparsity s equals masks' layerwise pruning of fraction s."""
    p = _tree(3)
    pr = masks.prunable_leaves(p)
    for s in (0.0, 0.2, 0.7, 1.0):
        ours = patterns.prune(jax.tree_util.tree_map(jnp.abs, p), masks.ones_like(p), pr, s)
        theirs = masks.magnitude_prune(p, masks.ones_like(p), pr, s, scope="layerwise")
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_array_equal(a, b)


def test_gradual_nm_counts():
    """Below 1 − n/m the per-group count is ceil(s · m); at and above it, exactly m − n."""
    assert patterns.pruned_count("n:m", 0.25, (8, 3), n=2, m=4) == 1
    assert patterns.pruned_count("n:m", 0.5, (8, 3), n=2, m=4) == 2
    assert patterns.pruned_count("n:m", 0.9, (8, 3), n=2, m=4) == 2
    assert patterns.pruned_count("n:m", 2 / 3, (6, 3), n=1, m=3) == 2
