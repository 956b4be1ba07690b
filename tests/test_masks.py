"""jaxprune.masks: exact counts, deterministic ties, global vs layerwise, random masks, the masked optimizer; the
jittable backend against the host one; plain-dict and NNX (State, Optimizer) trees."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
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
    """All 10 weights tie; half go: the later ones in flattening order ("a" before "b", row-major), as units keep the
    lower index (conventions' one tie-break). Both backends, eagerly and under jit."""
    p = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((2, 2))}}
    pr = masks.prunable_leaves(p)
    runs = [masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5, backend=b) for b in ("host", "jax")]
    runs.append(jax.jit(lambda p, m: masks.magnitude_prune(p, m, pr, 0.5))(p, masks.ones_like(p)))
    for m in runs:
        np.testing.assert_array_equal(m["a"]["kernel"], [[True, True, True], [True, True, False]])
        np.testing.assert_array_equal(m["b"]["kernel"], [[False, False], [False, False]])


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
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
    # 2 of 3 survivors go: 3.0, then of the tied ``big``s the later one
    np.testing.assert_array_equal(masks.prune_by_score(s, m, pr, 0.5)["a"]["kernel"], [[False, True], [False, False]])
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


# ------------------------------------------------------------------------------------- the jittable backend
_TIED = (-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0)  # few values: ties are common; -0.0 ties with 0.0


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=4),
       st.sampled_from([0.0, 0.1, 0.2, 1 / 3, 0.5, 0.8, 1.0]) | st.floats(0.0, 1.0),
       st.sampled_from(masks.SCOPES), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_jitted_pruning_equals_host_pruning_ties_included(shapes, fraction, scope, seed, density):
    """The jax backend under ``jit`` (and called eagerly) gives the host's mask: the same ``ceil(fraction ·
    remaining)`` count per group and, among equal scores, the same weights (last in flattening order) pruned."""
    rng = np.random.default_rng(seed)
    scores = {f"dense_{i}": {"kernel": jnp.asarray(rng.choice(_TIED, s), jnp.float32),
                             "bias": jnp.asarray(rng.choice(_TIED, s[-1:]), jnp.float32)} for i, s in enumerate(shapes)}
    mask = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.random(x.shape) < density), scores)  # some pruned
    pr = masks.prunable_leaves(scores)
    host = masks.prune_by_score(scores, mask, pr, fraction, scope, backend="host")
    jitted = jax.jit(lambda s, m: masks.prune_by_score(s, m, pr, fraction, scope))(scores, mask)
    assert _leaves_equal(jitted, host)
    assert _leaves_equal(masks.prune_by_score(scores, mask, pr, fraction, scope, backend="jax"), host)
    groups = [[k] for k in scores] if scope == "layerwise" else [list(scores)]
    for g in groups:  # exact counts, independently of either backend
        before = sum(int(mask[k]["kernel"].sum()) for k in g)
        assert sum(int(jitted[k]["kernel"].sum()) for k in g) == before - math.ceil(fraction * before - 1e-9)
    for k in scores:
        np.testing.assert_array_equal(jitted[k]["bias"], mask[k]["bias"])  # not prunable: unchanged


def test_jitted_magnitude_prune_ties_and_float32_count_trap():
    """``0.2 · 265`` is 53.0000008 in float32 (ceil 54); the jitted count is the host's 53. All weights tie: the
    last 53 in flattening order go."""
    p = {"a": {"kernel": jnp.ones((5, 53))}}
    pr = masks.prunable_leaves(p)
    m = jax.jit(lambda p, m: masks.magnitude_prune(p, m, pr, 0.2))(p, masks.ones_like(p))
    np.testing.assert_array_equal(m["a"]["kernel"].ravel(), np.arange(265) < 265 - 53)
    # levels: 265 → 212 → 169 (ceil(0.2 · 212) = 43) under jit as on the host
    m2 = jax.jit(lambda p, m: masks.magnitude_prune(p, m, pr, 0.2))(p, m)
    assert int(m2["a"]["kernel"].sum()) == 169
    assert _leaves_equal(m2, masks.magnitude_prune(p, m, pr, 0.2, backend="host"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8])
def test_jax_backend_matches_host_for_score_dtypes(dtype):
    rng = np.random.default_rng(1)
    raw = rng.choice([0, 1, 2, 3, 200], (6, 7)) * (1 if dtype == jnp.uint8 else rng.choice([-1, 1], (6, 7)))
    s = {"a": {"kernel": jnp.asarray(raw, dtype)}, "b": {"kernel": jnp.asarray(raw.T[:3], dtype)}}
    pr = {"a": {"kernel": True}, "b": {"kernel": True}}
    m = masks.ones_like(s)
    for scope in masks.SCOPES:
        for f in (0.3, 0.5, 0.9):
            host = masks.prune_by_score(s, m, pr, f, scope, backend="host")
            assert _leaves_equal(jax.jit(lambda s, m: masks.prune_by_score(s, m, pr, f, scope))(s, m), host)


def test_jax_backend_under_vmap_prunes_each_member_as_the_host_does():
    p = _params(3)
    pr = masks.prunable_leaves(p)
    starts = [masks.ones_like(p), masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5)]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *starts)
    out = jax.jit(jax.vmap(lambda m: masks.magnitude_prune(p, m, pr, 0.3, "layerwise")))(stacked)
    for i, m in enumerate(starts):
        assert _leaves_equal(jax.tree_util.tree_map(lambda x: x[i], out),
                             masks.magnitude_prune(p, m, pr, 0.3, "layerwise", backend="host"))


def test_backend_errors_name_the_argument():
    p = _params()
    pr, m = masks.prunable_leaves(p), masks.ones_like(p)
    with pytest.raises(ValueError, match=r"backend='host': params or mask are traced"):
        jax.jit(lambda p, m: masks.magnitude_prune(p, m, pr, 0.5, backend="host"))(p, m)
    with pytest.raises(ValueError, match=r"backend='gpu': expected one of \('auto', 'host', 'jax'\)"):
        masks.magnitude_prune(p, m, pr, 0.5, backend="gpu")
    with pytest.raises(ValueError, match=r"fraction: a traced value; expected a Python float"):
        jax.jit(lambda p, m, f: masks.magnitude_prune(p, m, pr, f))(p, m, 0.5)
    with pytest.raises(ValueError, match=r"prunable: leaf 'dense_0/bias' has type .*Tracer \(traced: close over"):
        jax.jit(lambda p, m, q: masks.magnitude_prune(p, m, q, 0.5))(p, m, pr)
    bad = {**p, "dense_1": {**p["dense_1"], "kernel": p["dense_1"]["kernel"].at[0, 0].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"params: 1 NaN or ±Inf values among the surviving weights of 'dense_1/k"):
        masks.magnitude_prune(bad, m, pr, 0.5, backend="jax")


# ------------------------------------------------------------------------------ any pytree: dicts and NNX
def test_default_prunable_is_floating_ndim_2_whatever_the_name():
    p = {"w1": jnp.arange(12.0).reshape(3, 4) - 5.5, "b1": jnp.ones(4), "w2": jnp.arange(8.0).reshape(4, 2) - 3.7,
         "steps": jnp.zeros((2, 2), jnp.int32)}
    pr = masks.prunable_leaves(p)
    assert pr == {"w1": True, "b1": False, "w2": True, "steps": False}
    assert masks.default_prunable("x", jax.ShapeDtypeStruct((3, 3), jnp.bfloat16))
    assert not masks.default_prunable("x", jax.ShapeDtypeStruct((3, 3), jnp.uint32))
    # 20 prunable weights, global 0.5: the 10 smallest |w| go (among ties the later in flattening order w1, w2)
    m = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5)
    flat = np.abs(np.concatenate([np.asarray(p["w1"]).ravel(), np.asarray(p["w2"]).ravel()]))
    gone = np.lexsort((-np.arange(20), flat))[:10]
    want = np.ones(20, bool)
    want[gone] = False
    np.testing.assert_array_equal(np.concatenate([np.asarray(m["w1"]).ravel(), np.asarray(m["w2"]).ravel()]), want)
    assert bool(m["b1"].all()) and bool(m["steps"].all())
    assert masks.density_report(m, pr) == {"density": 0.5, "kept": 10, "total": 20,
                                           "layers": {"w1": float(want[:12].mean()), "w2": float(want[12:].mean())}}
    out = masks.apply_mask(p, m)
    np.testing.assert_array_equal(np.asarray(out["w1"]).ravel(), np.where(want[:12], np.asarray(p["w1"]).ravel(), 0))
    assert _leaves_equal(jax.jit(lambda p, m: masks.magnitude_prune(p, m, pr, 0.5))(p, masks.ones_like(p)), m)


def test_path_str_drops_only_an_attribute_named_value():
    tu = jax.tree_util
    assert masks.path_str((tu.DictKey("fc1"), tu.DictKey("kernel"), tu.GetAttrKey("value"))) == "fc1/kernel"
    assert masks.path_str((tu.DictKey("fc1"), tu.DictKey("value"))) == "fc1/value"  # a leaf named value stays
    assert masks.path_str((tu.SequenceKey(0), tu.GetAttrKey("mu"))) == "0/mu"


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc1(x)))


def _host_reference(params: dict, fraction: float) -> np.ndarray:
    """The expected global magnitude mask of fc1/kernel then head/kernel, flattened, computed with numpy only."""
    w = np.abs(np.concatenate([np.asarray(params["fc1"]["kernel"]).ravel(),
                               np.asarray(params["head"]["kernel"]).ravel()]))
    keep = np.ones(w.size, bool)
    keep[np.lexsort((-np.arange(w.size), w))[:math.ceil(fraction * w.size - 1e-9)]] = False  # ties: later goes
    return keep


def _flat_kernels(mask) -> np.ndarray:
    m = nnx.as_pure(mask) if isinstance(mask, nnx.State) else mask
    return np.concatenate([np.asarray(m["fc1"]["kernel"]).ravel(), np.asarray(m["head"]["kernel"]).ravel()])


def test_nnx_state_prunes_with_exact_counts():
    model = _Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    pr = masks.prunable_leaves(params)
    assert nnx.as_pure(pr) == nnx.as_pure(nnx.State({"fc1": {"kernel": True, "bias": False},
                                                     "head": {"kernel": True, "bias": False}}))
    m = masks.magnitude_prune(params, masks.ones_like(params), pr, 0.5)  # 30 + 15 weights: 23 go
    rep = masks.density_report(m, pr)
    assert (rep["kept"], rep["total"], sorted(rep["layers"])) == (22, 45, ["fc1/kernel", "head/kernel"])
    np.testing.assert_array_equal(_flat_kernels(m), _host_reference(nnx.as_pure(params), 0.5))
    assert _leaves_equal(jax.jit(lambda s, m: masks.magnitude_prune(s, m, pr, 0.5))(params, masks.ones_like(params)),
                         m)
    # a pure mask (no Variable wrappers) belongs to the params State too; the result has the params' containers
    pure = masks.magnitude_prune(params, nnx.as_pure(masks.ones_like(params)), pr, 0.5)
    assert _leaves_equal(pure, m) and jax.tree_util.tree_structure(pure) == jax.tree_util.tree_structure(m)
    with pytest.raises(ValueError, match=r"mask: has no leaf 'head/bias'"):
        masks.apply_mask(params, nnx.State({"fc1": nnx.as_pure(m)["fc1"], "head": {"kernel": m["head"]["kernel"]}}))
    # layerwise: ceil(0.5 · 30) = 15 and ceil(0.5 · 15) = 8
    lw = masks.density_report(masks.magnitude_prune(params, masks.ones_like(params), pr, 0.5, "layerwise"), pr)
    assert lw["layers"] == {"fc1/kernel": 15 / 30, "head/kernel": 7 / 15}
    # exclude and biases name NNX paths as they read
    pr2 = masks.prunable_leaves(params, exclude=("^head/",), biases=True)
    assert nnx.as_pure(pr2) == nnx.as_pure(nnx.State({"fc1": {"kernel": True, "bias": True},
                                                      "head": {"kernel": False, "bias": False}}))
    # apply_mask keeps the State of Params, so the model can take it back
    nnx.update(model, masks.apply_mask(params, m))
    w = _flat_kernels(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(w != 0, _flat_kernels(m))


@pytest.mark.parametrize("inner", [optax.adam(1e-2), optax.sgd(0.1, momentum=0.9)])
def test_nnx_optimizer_over_masked_keeps_pruned_weights_and_moments_at_zero(inner):
    model = _Net(nnx.Rngs(1))
    tx = masks.masked(inner)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
    loss = lambda m: jnp.sum(jnp.sin(m(x)) ** 2 + m(x))

    def step():
        opt.update(model, nnx.grad(loss)(model))

    step()  # dense moments, then prune: with_mask must zero them
    params = nnx.state(model, nnx.Param)
    pr = masks.prunable_leaves(params)
    m = masks.magnitude_prune(params, opt.opt_state.mask, pr, 0.6)  # the optimizer's mask: OptVariables
    np.testing.assert_array_equal(_flat_kernels(m), _host_reference(nnx.as_pure(params), 0.6))
    opt.opt_state = masks.with_mask(tx, opt.opt_state, m)
    assert type(opt.opt_state.mask["fc1"]["kernel"]) is type(nnx.state(opt)["opt_state"]["mask"]["fc1"]["kernel"])
    np.testing.assert_array_equal(_flat_kernels(nnx.as_pure(opt.opt_state.mask)), _flat_kernels(m))
    nnx.update(model, masks.apply_mask(params, m))
    before = _flat_kernels(nnx.state(model, nnx.Param))
    for _ in range(3):
        step()
    after = _flat_kernels(nnx.state(model, nnx.Param))
    pruned = ~_flat_kernels(m)
    assert pruned.sum() == math.ceil(0.6 * 45 - 1e-9) == 27
    assert (after[pruned] == 0).all() and (after[~pruned] != before[~pruned]).all()
    moments = optax.tree_utils.tree_map_params(
        masks._inner_of(tx), lambda v, mk: np.asarray(v)[~np.asarray(mk)], nnx.as_pure(opt.opt_state).inner,
        nnx.as_pure(m), transform_non_params=lambda v: np.zeros(0))
    leaves = jax.tree_util.tree_leaves(moments)
    assert leaves and all((leaf == 0).all() for leaf in leaves)
