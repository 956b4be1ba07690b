"""jaxprune.masks: exact counts, deterministic ties, global vs layerwise, random masks, the masked optimizer."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import masks


def _params(seed=0, shapes=((20, 10), (10, 5), (5, 3))):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {f"dense_{i}": {"kernel": jax.random.normal(k, s), "bias": jnp.ones(s[-1])}
            for i, (k, s) in enumerate(zip(keys, shapes))}


def test_prunable_selection_and_exclusion():
    p = _params()
    pr = masks.prunable_leaves(p)
    assert pr["dense_0"]["kernel"] and not pr["dense_0"]["bias"]
    pr = masks.prunable_leaves(p, exclude=("^dense_2/",))
    assert not pr["dense_2"]["kernel"] and pr["dense_1"]["kernel"]
    with pytest.raises(ValueError, match="no leaf is prunable"):
        masks.prunable_leaves(p, exclude=("dense",))


def test_counts_follow_ceil_recurrence_over_levels():
    p = _params()
    pr = masks.prunable_leaves(p)
    m = masks.ones_like(p)
    remaining = 200 + 50 + 15
    for level in range(1, 8):
        m = masks.magnitude_prune(p, m, pr, 0.2)
        remaining -= math.ceil(0.2 * remaining)
        rep = masks.density_report(m, pr)
        assert rep["kept"] == remaining
        assert abs(rep["density"] - 0.8 ** level) < 3 / 265 * level  # (1-p)^k up to rounding
        assert all(bool(b.all()) for b in (m["dense_0"]["bias"], m["dense_1"]["bias"]))  # biases never pruned


def test_global_compares_raw_magnitudes_across_layers():
    p = {"a": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, "b": {"kernel": jnp.array([[0.5, 10.0], [-0.1, 5.0]])}}
    pr = masks.prunable_leaves(p)
    m = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5)  # remove 4 of 8: |w| 0.1, 0.5, 1, 2
    np.testing.assert_array_equal(m["a"]["kernel"], [[False, False], [True, True]])
    np.testing.assert_array_equal(m["b"]["kernel"], [[False, True], [False, True]])
    lw = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5, scope="layerwise")
    np.testing.assert_array_equal(lw["a"]["kernel"], [[False, False], [True, True]])
    np.testing.assert_array_equal(lw["b"]["kernel"], [[False, True], [False, True]])
    lw = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.25, scope="layerwise")  # one per layer
    assert int(lw["a"]["kernel"].sum()) == 3 and int(lw["b"]["kernel"].sum()) == 3
    assert not bool(lw["b"]["kernel"][1, 0])


def test_ties_are_broken_by_flattening_order():
    p = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((2, 2))}}
    m = masks.magnitude_prune(p, masks.ones_like(p), masks.prunable_leaves(p), 0.5)
    np.testing.assert_array_equal(m["a"]["kernel"], [[False, False, False], [False, False, True]])
    np.testing.assert_array_equal(m["b"]["kernel"], [[True, True], [True, True]])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
       st.floats(0.0, 1.0), st.sampled_from(masks.SCOPES), st.integers(0, 10_000), st.integers(1, 3))
def test_pruning_property(shapes, fraction, scope, seed, levels):
    p = _params(seed, shapes)
    pr = masks.prunable_leaves(p)
    m = masks.ones_like(p)
    for _ in range(levels):
        before = m
        m = masks.magnitude_prune(p, m, pr, fraction, scope)
        groups = [[k] for k in p] if scope == "layerwise" else [list(p)]
        for g in groups:
            b = sum(int(before[k]["kernel"].sum()) for k in g)
            a = sum(int(m[k]["kernel"].sum()) for k in g)
            assert a == b - math.ceil(fraction * b - 1e-9)
            kept = np.concatenate([np.abs(np.asarray(p[k]["kernel"]))[np.asarray(m[k]["kernel"])] for k in g])
            gone = np.concatenate([np.abs(np.asarray(p[k]["kernel"]))[np.asarray(before[k]["kernel"] & ~m[k]["kernel"])]
                                   for k in g])
            if kept.size and gone.size:
                assert gone.max() <= kept.min()
        for k in p:  # pruning never revives a weight
            assert not bool((m[k]["kernel"] & ~before[k]["kernel"]).any())


def test_random_like_keeps_per_layer_counts():
    p = _params()
    pr = masks.prunable_leaves(p)
    m = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.7, scope="global")
    r = masks.random_like(jax.random.PRNGKey(3), m, pr)
    for k in p:
        assert int(r[k]["kernel"].sum()) == int(m[k]["kernel"].sum())
    assert not np.array_equal(r["dense_0"]["kernel"], m["dense_0"]["kernel"])
    assert masks.density_report(r, pr)["layers"] == masks.density_report(m, pr)["layers"]
    rp = masks.random_prune(jax.random.PRNGKey(4), masks.ones_like(p), pr, 0.5)
    assert masks.density_report(rp, pr)["kept"] == 265 - math.ceil(0.5 * 265)


def test_bad_arguments():
    p = _params()
    pr = masks.prunable_leaves(p)
    with pytest.raises(ValueError, match=r"fraction=1.5"):
        masks.magnitude_prune(p, masks.ones_like(p), pr, 1.5)
    with pytest.raises(ValueError, match=r"scope='local'"):
        masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5, scope="local")


@pytest.mark.parametrize("inner", [
    optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)),
    optax.adam(1e-2),
    optax.adamw(1e-2, weight_decay=0.1),
])
def test_masked_optimizer_keeps_pruned_weights_and_moments_at_zero(inner):
    p = _params()
    pr = masks.prunable_leaves(p)
    tx = masks.masked(inner)
    state = tx.init(p)
    # moments accumulated while dense, then prune: with_mask must zero them
    g = jax.tree_util.tree_map(jnp.ones_like, p)
    _, state = tx.update(g, state, p)
    m = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.6)
    state = masks.with_mask(tx, state, m)
    params = masks.apply_mask(p, m)
    loss = lambda q: sum(jnp.sum(jnp.sin(x) ** 2 + x) for x in jax.tree_util.tree_leaves(q))
    for _ in range(5):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for k in p:
        pruned = ~np.asarray(m[k]["kernel"])
        assert (np.asarray(params[k]["kernel"])[pruned] == 0).all()
        assert (np.asarray(params[k]["kernel"])[~pruned] != np.asarray(p[k]["kernel"])[~pruned]).all()
    moments = optax.tree_utils.tree_map_params(
        masks._inner_of(tx), lambda x, mk: np.asarray(x)[~np.asarray(mk)], state.inner, m,
        transform_non_params=lambda x: np.zeros(0))
    for leaf in jax.tree_util.tree_leaves(moments):
        assert (leaf == 0).all()


def test_biases_of_pruned_layers_are_ranked_with_their_weights():
    """``biases=True``: a bias is prunable exactly where its module's kernel is (not a BatchNorm offset), and
    global magnitude pruning ranks biases and weights in one list."""
    p = _params()
    p["dense_1"]["bias"] = jnp.full((5,), 1e-4)  # smaller than every weight: pruned first
    p["bn_0"] = {"scale": jnp.ones(5), "bias": jnp.zeros(5)}
    pr = masks.prunable_leaves(p, exclude=("^dense_2/",), biases=True)
    assert pr["dense_0"]["bias"] and pr["dense_1"]["bias"] and not pr["dense_2"]["bias"]
    assert not pr["bn_0"]["bias"] and not pr["bn_0"]["scale"]
    m = masks.magnitude_prune(p, masks.ones_like(p), pr, 5 / (200 + 10 + 50 + 5), "global")
    assert not np.asarray(m["dense_1"]["bias"]).any() and np.asarray(m["dense_0"]["kernel"]).all()
    assert masks.density_report(m, pr)["total"] == 200 + 10 + 50 + 5


def test_non_finite_scores_are_refused_and_counts_are_exact_for_any_finite_scores():
    """An ``inf`` survivor used to tie with the sentinel that ranked pruned weights last: fraction 1.0 of
    ``[[1, 2], [3, inf]]`` (``[0, 0]`` already pruned) removed only 2 of the 3 survivors."""
    p = {"a": {"kernel": jnp.array([[1.0, 2.0], [3.0, jnp.inf]])}}
    m = {"a": {"kernel": jnp.array([[False, True], [True, True]])}}
    pr = {"a": {"kernel": True}}
    for bad in (jnp.inf, -jnp.inf):
        with pytest.raises(ValueError, match=r"params: 1 NaN or ±Inf values among the surviving weights of 'a/k"):
            masks.magnitude_prune({"a": {"kernel": p["a"]["kernel"].at[1, 1].set(bad)}}, m, pr, 1.0)
    with pytest.raises(ValueError, match=r"scores: 1 NaN or ±Inf .* of 'a/kernel'"):
        masks.prune_by_score(p, m, pr, 0.5, "layerwise")
    # the largest finite scores are ranked as scores; an already-pruned weight ranks last whatever its score
    big = float(np.finfo(np.float32).max)
    s = {"a": {"kernel": jnp.array([[jnp.nan, big], [3.0, big]])}}
    np.testing.assert_array_equal(masks.prune_by_score(s, m, pr, 1.0)["a"]["kernel"], np.zeros((2, 2), bool))
    np.testing.assert_array_equal(masks.prune_by_score(s, m, pr, 0.5)["a"]["kernel"], [[False, False], [False, True]])
    s = {"a": {"kernel": jnp.array([[-jnp.inf, big], [3.0, big]])}}  # a pruned -inf is not "the lowest survivor"
    np.testing.assert_array_equal(masks.prune_by_score(s, m, pr, 0.3)["a"]["kernel"], [[False, True], [False, True]])


def test_bias_of_an_excluded_kernel_is_not_prunable():
    p = {"dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
         "dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))}}
    pr = masks.prunable_leaves(p, exclude=("dense_0/kernel",), biases=True)
    assert pr == {"dense_0": {"kernel": False, "bias": False}, "dense_1": {"kernel": True, "bias": True}}


def _tx_state(p):
    tx = masks.masked(optax.sgd(0.1, momentum=0.9))
    return tx, tx.init(p)


_P = {"d": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4), "bias": jnp.ones((4,))}}
_M = masks.ones_like(_P)
_PR = {"d": {"kernel": True, "bias": False}}
_ROW = {"d": {"kernel": jnp.array([True, False, True, False]), "bias": jnp.ones((4,), bool)}}  # (4,) for (3, 4)


@pytest.mark.parametrize("call,match", [
    (lambda: masks.apply_mask(_P, _ROW), r"mask: leaf 'd/kernel' has shape \(4,\); expected \(3, 4\)"),
    (lambda: masks.with_mask(*_tx_state(_P), _ROW), r"mask: leaf 'd/kernel' has shape \(4,\); expected \(3, 4\)"),
    (lambda: masks.magnitude_prune(_P, _ROW, _PR, 0.5), r"mask: leaf 'd/kernel' has shape \(4,\)"),
    (lambda: masks.apply_mask(_P, {"d": {**_M["d"], "kernel": jnp.ones((3, 4))}}),
     r"mask: leaf 'd/kernel' has dtype float32; expected bool"),
    (lambda: masks.density_report({**_M, "e": {"kernel": jnp.zeros((2, 2), bool)}}, _PR),
     r"prunable: has no leaf 'e/kernel'; expected the structure of mask"),
    (lambda: masks.density_report(_M, {"d": {"kernel": True, "bias": False, "scale": False}}),
     r"prunable: leaf 'd/scale' is not in mask"),
    (lambda: masks.random_like(jax.random.PRNGKey(0), _M, {"e": {"kernel": True}}), r"prunable: has no leaf 'd/bias'"),
    (lambda: masks.magnitude_prune(_P, _M, {"d": {"kernel": False, "bias": False}}, 0.5),
     r"prunable: no leaf is prunable"),
    (lambda: masks.magnitude_prune(_P, _M, {"d": {"kernel": False, "bias": False}}, 0.5, "layerwise"),
     r"prunable: no leaf is prunable"),
    (lambda: masks.magnitude_prune({}, {}, {}, 0.5), r"prunable: no leaf is prunable"),
    (lambda: masks.random_prune(jax.random.PRNGKey(0), _M, {"d": {"kernel": jnp.ones((3, 4), bool), "bias": False}},
                                0.5), r"prunable: leaf 'd/kernel' has type ArrayImpl; expected a Python bool"),
])
def test_trees_that_do_not_belong_together_are_refused_naming_the_leaf(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tree_checks_are_static_under_jit_and_vmap():
    """The checks read only structure, shapes and dtypes, so masks may be traced values (as in imp's vmapped
    replica start states); a wrong shape is refused while tracing."""
    out = jax.jit(masks.apply_mask)(_P, masks.magnitude_prune(_P, _M, _PR, 0.5))
    np.testing.assert_array_equal(out["d"]["kernel"], np.where(np.arange(1, 13).reshape(3, 4) > 6,
                                                               np.arange(1, 13).reshape(3, 4), 0))
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), (_P, _M))
    assert jax.vmap(masks.apply_mask)(*stacked)["d"]["kernel"].shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"mask: leaf 'd/kernel' has shape \(4,\)"):
        jax.jit(masks.apply_mask)(_P, _ROW)
