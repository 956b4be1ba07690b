"""jaxprune.sparse_training: gradual densities equal Zhu & Gupta's closed form at every step; SET/RigL keep every
layer's count, grown weights start at 0 with their moments reset, growth follows the dense gradient; ERK equals
its closed form; an orbax save/restore of the optimizer state mid-run resumes bit-identically."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import checkpoint, masks, patterns
from jaxprune import sparse_training as st

SHAPES = {"enc": (16, 12), "mid": (12, 8), "head": (8, 4)}


def _params(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(SHAPES))
    return {name: {"w": jax.random.normal(k, s), "b": jnp.zeros(s[-1])} for k, (name, s) in zip(keys, SHAPES.items())}


def _loss(params, x, y):
    h = x
    for name in SHAPES:
        h = h @ params[name]["w"] + params[name]["b"]
        h = jnp.tanh(h) if name != "head" else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def _batch(step):
    kx, ky = jax.random.split(jax.random.PRNGKey(1000 + step))
    return jax.random.normal(kx, (32, 16)), jax.random.randint(ky, (32,), 0, 4)


def _run(tx, params, steps, state=None, start=0, record=None):
    state = tx.init(params) if state is None else state
    params = st.apply_mask(params, state) if start == 0 else params

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(_loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, g

    for t in range(start, steps):
        before, old = state, params
        params, state, grads = step(params, state, *_batch(t))
        if record is not None:
            record(t, (before, old), state, params, grads)
    return params, state


def _zg(t, s_i, s_f, t0, n, dt):
    """Zhu & Gupta (2017), eq. (1): the sparsity in force after step t (dense before t0)."""
    if t < t0:
        return 0.0
    k = min((t - t0) // dt, n)
    return s_f + (s_i - s_f) * (1 - k / n) ** 3


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("s_i", [0.0, 0.25])
def test_gradual_densities_equal_closed_form_at_every_step(s_i):
    p = _params()
    pr = masks.prunable_leaves(p)
    cfg = st.Gradual(final_sparsity=0.9, begin_step=3, end_step=15, frequency=4, initial_sparsity=s_i)
    seen = []

    def record(t, start, after, params, grads):
        before = start[0]
        s = _zg(t, s_i, 0.9, 3, 3, 4)
        for name, shape in SHAPES.items():
            n = math.prod(shape)
            kept = int(after.masked.mask[name]["w"].sum())
            assert kept == n - math.ceil(s * n - 1e-9), (t, name)
            assert bool(jnp.all(params[name]["w"][~after.masked.mask[name]["w"]] == 0))  # pruned weights are 0
            assert not bool((after.masked.mask[name]["w"] & ~before.masked.mask[name]["w"]).any())  # never regrown
        seen.append(t)

    _run(st.gradual(optax.adam(1e-2), pr, cfg), p, 20, record=record)
    assert seen == list(range(20))


def test_gradual_prunes_lowest_magnitude_layerwise():
    """One update at step 0 to 50 %: the mask equals masks' layerwise magnitude pruning of the same params."""
    p = _params(2)
    pr = masks.prunable_leaves(p)
    tx = st.gradual(optax.sgd(0.0), pr, st.Gradual(final_sparsity=0.5, begin_step=0, end_step=0, frequency=1))
    _, state = _run(tx, p, 1)
    ref = masks.magnitude_prune(p, masks.ones_like(p), pr, 0.5, scope="layerwise")
    for a, b in zip(jax.tree_util.tree_leaves(st.mask_of(state)), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_gradual_into_2_of_4_and_blocks():
    p = _params()
    pr = masks.prunable_leaves(p)
    nm = st.Gradual(final_sparsity=0.5, begin_step=0, end_step=4, frequency=2, pattern="n:m",
                    options={"n": 2, "m": 4})
    _, state = _run(st.gradual(optax.sgd(0.1), pr, nm), p, 6)
    rep = st.report(state, pr, "n:m", {"n": 2, "m": 4})
    assert rep["density"] == 0.5 and all(rep["conforms"].values()) and rep["pattern"] == "2:4 (axis -2)"
    blk = st.Gradual(final_sparsity=0.75, begin_step=0, end_step=4, frequency=2, pattern="block",
                     options={"block": (4, 4)})
    _, state = _run(st.gradual(optax.sgd(0.1), pr, blk), p, 6)
    rep = st.report(state, pr, "block", {"block": (4, 4)})
    assert all(rep["conforms"].values()) and rep["kept"] == (20 - 9 - 5 - 2) * 16  # ceil(.75·{12, 6, 2}) blocks of 16
    with pytest.raises(ValueError, match="final_sparsity=0.6.*1 - n/m"):
        st.gradual(optax.sgd(0.1), pr, st.Gradual(0.6, 0, 4, 2, pattern="n:m", options={"n": 2, "m": 4})).init(p)
    with pytest.raises(ValueError, match="enc/w: m=3: the axis length 16"):
        st.gradual(optax.sgd(0.1), pr, st.Gradual(2 / 3, 0, 4, 2, pattern="n:m", options={"n": 1, "m": 3})).init(p)


def test_config_errors():
    with pytest.raises(ValueError, match="end_step=10: expected begin_step=3 \\+ a multiple of frequency=4"):
        st.Gradual(final_sparsity=0.5, begin_step=3, end_step=10, frequency=4)
    with pytest.raises(ValueError, match="final_sparsity=1.5"):
        st.Gradual(final_sparsity=1.5, begin_step=0, end_step=4, frequency=2)
    with pytest.raises(ValueError, match="method='snip'"):
        st.Dynamic("snip", 0.9)
    with pytest.raises(ValueError, match="end_step=0: expected an int > interval=100"):
        st.Dynamic("rigl", 0.9)
    with pytest.raises(ValueError, match="distribution='er'"):
        st.Dynamic("static", 0.9, distribution="er")
    p = _params()
    tx = st.dynamic(optax.sgd(0.1), masks.prunable_leaves(p), st.Dynamic("static", 0.5), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="params: sparse training needs them"):
        tx.update(p, tx.init(p))


def test_erk_equals_closed_form():
    """Evci et al. (2020): density_l = ε (Σ shape_l) / Π shape_l, Σ density_l N_l = (1 − s) Σ N_l; a layer whose
    density would exceed 1 is dense and ε re-solved."""
    shapes = {"a": (784, 300), "b": (300, 100), "c": (100, 10), "conv": (3, 3, 4, 8)}
    n = {k: float(np.prod(s)) for k, s in shapes.items()}
    raw = {k: float(np.sum(s)) / n[k] for k, s in shapes.items()}
    s = 0.9
    # without redistribution c (raw 0.11) and conv (raw ≈ 0.064) would exceed 1: ε = 0.1 ΣN / Σ raw N ≈ 17.7
    eps0 = (1 - s) * sum(n.values()) / sum(raw[k] * n[k] for k in n)
    assert eps0 * raw["c"] > 1 and eps0 * raw["conv"] > 1
    eps = ((1 - s) * sum(n.values()) - n["c"] - n["conv"]) / (raw["a"] * n["a"] + raw["b"] * n["b"])
    got = st.erk_densities(shapes, s)
    assert got["c"] == 1.0 and got["conv"] == 1.0
    np.testing.assert_allclose([got["a"], got["b"]], [eps * raw["a"], eps * raw["b"]], rtol=1e-12)
    np.testing.assert_allclose(sum(got[k] * n[k] for k in n), (1 - s) * sum(n.values()), rtol=1e-12)
    # no layer dense at low sparsity: densities proportional to the raw ratios
    low = st.erk_densities({"a": (784, 300), "b": (300, 100)}, 0.9)
    np.testing.assert_allclose(low["a"] / low["b"], raw["a"] / raw["b"], rtol=1e-12)
    p = {k: {"kernel": jnp.zeros(v)} for k, v in shapes.items()}
    sp = st.layer_sparsities(p, masks.prunable_leaves(p), s, "erk")
    np.testing.assert_allclose(sp["a/kernel"], 1 - eps * raw["a"], rtol=1e-12)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dst_keeps_counts_zeroes_grown_and_resets_moments(method):
    p = _params()
    pr = masks.prunable_leaves(p)
    cfg = st.Dynamic(method, 0.8, distribution="uniform", interval=3, end_step=14)
    counts = {name: math.prod(s) - math.ceil(0.8 * math.prod(s) - 1e-9) for name, s in SHAPES.items()}
    changed = []

    def record(t, start, after, params, grads):
        before, before_params = start
        for name in SHAPES:
            old, new = before.masked.mask[name]["w"], after.masked.mask[name]["w"]
            assert int(new.sum()) == counts[name], (t, name)
            assert bool(jnp.all(params[name]["w"][~new] == 0))
            if t % 3 or t == 0 or t >= 14:
                assert bool(jnp.all(old == new))
                continue
            w, w0 = params[name]["w"], before_params[name]["w"]
            regrown = old & new & (w == 0) & (w0 != 0)  # dropped and grown again in one update: restarts at 0
            grown = (new & ~old) | regrown
            changed.append(int((new & ~old).sum()))
            assert bool(jnp.all(w[grown] == 0))  # grown weights start at exactly 0
            mu, nu = after.masked.inner[0].mu[name]["w"], after.masked.inner[0].nu[name]["w"]
            assert bool(jnp.all(mu[grown] == 0)) and bool(jnp.all(nu[grown] == 0))  # moments reset
            kept = old & new & ~regrown
            np.testing.assert_array_equal(w[kept], w0[kept])  # no gradient step on a rewiring step
            assert bool(jnp.all(mu[kept] == before.masked.inner[0].mu[name]["w"][kept]))

    _run(st.dynamic(optax.adam(1e-2), pr, cfg, jax.random.PRNGKey(3)), p, 16, record=record)
    assert len(changed) == 4 * 3 and sum(changed) > 0


def test_rigl_grows_by_dense_gradient_and_drops_by_magnitude():
    """One rewiring on a hand-made leaf: drop the ceil(f·active) smallest |w| among the active, grow the largest
    |grad| among the rest; f = 0.3/2·(1 + cos(π·3/12))."""
    w = jnp.array([[0.0, 5.0, -1.0, 0.0], [0.2, 0.0, 3.0, 0.0], [0.0, -0.1, 0.0, 4.0]])
    g = jnp.array([[9.0, 0.0, 0.0, -7.0], [0.0, 1.0, 0.0, 2.0], [6.0, 0.0, 8.0, 0.0]])
    mask = w != 0
    params = {"k": w}
    pr = {"k": True}
    cfg = st.Dynamic("rigl", 0.5, distribution="uniform", interval=3, end_step=12)
    tx = st.dynamic(optax.sgd(0.1), pr, cfg, jax.random.PRNGKey(0))
    state = tx.init(params)
    installed = masks.with_mask(masks.masked(optax.sgd(0.1)), state.masked, {"k": mask})
    state = state._replace(step=jnp.array(3, jnp.int32), masked=installed)
    f = 0.15 * (1 + math.cos(math.pi * 3 / 12))
    k = math.ceil(f * 6 - 1e-9)  # 6 active → 2 dropped: |w| 0.1 and 0.2
    assert k == 2
    updates, new = tx.update({"k": g}, state, params)
    expect = np.asarray(mask).copy()
    expect[2, 1] = expect[1, 0] = False  # dropped
    expect[0, 0] = expect[2, 2] = True  # grown: |g| 9 and 8
    np.testing.assert_array_equal(new.masked.mask["k"], expect)
    out = optax.apply_updates(params, updates)["k"]
    np.testing.assert_array_equal(out, np.where(expect & np.asarray(mask), w, 0.0))


def test_static_mask_is_random_exact_and_fixed():
    p = _params()
    pr = masks.prunable_leaves(p)
    cfg = st.Dynamic("static", 0.9, distribution="erk")
    tx = st.dynamic(optax.sgd(0.1), pr, cfg, jax.random.PRNGKey(5))
    s0 = tx.init(p)
    dens = st.erk_densities({f"{k}/w": v for k, v in SHAPES.items()}, 0.9)
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        assert int(s0.masked.mask[name]["w"].sum()) == n - math.ceil((1 - dens[f"{name}/w"]) * n - 1e-9)
    _, s1 = _run(tx, p, 5)
    for a, b in zip(jax.tree_util.tree_leaves(st.mask_of(s0)), jax.tree_util.tree_leaves(st.mask_of(s1))):
        np.testing.assert_array_equal(a, b)
    other = st.dynamic(optax.sgd(0.1), pr, cfg, jax.random.PRNGKey(6)).init(p)
    assert not bool(jnp.all(other.masked.mask["enc"]["w"] == s0.masked.mask["enc"]["w"]))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("which", ["rigl", "gradual"])
def test_resume_mid_training_is_bit_identical(tmp_path, which):
    p = _params()
    pr = masks.prunable_leaves(p)
    if which == "rigl":
        tx = st.dynamic(optax.adam(1e-2), pr, st.Dynamic("set", 0.8, interval=3, end_step=14),
                        jax.random.PRNGKey(7))
    else:
        tx = st.gradual(optax.adam(1e-2), pr, st.Gradual(0.8, 2, 14, 3))
    full_params, full_state = _run(tx, p, 16)
    half_params, half_state = _run(tx, p, 7)
    checkpoint.save(tmp_path / "ck", {"params": half_params, "opt": half_state})
    template = {"params": p, "opt": tx.init(p)}
    back = checkpoint.restore(tmp_path / "ck", template)
    assert isinstance(back["opt"], st.SparseState) and int(back["opt"].step) == 7
    res_params, res_state = _run(tx, back["params"], 16, state=back["opt"], start=7)
    for a, b in zip(jax.tree_util.tree_leaves((full_params, full_state)),
                    jax.tree_util.tree_leaves((res_params, res_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
