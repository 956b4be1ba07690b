"""LRP rules against slow float64 matrix-form references written from Montavon et al. (2019), plus the
invariants: conservation, ε → 0 equals gradient × input, BatchNorm folding, batch = vmap."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import graph, lrp, models
from jaxprune.lrp import composites, rules

# ----------------------------------------------------------------------------------------------- references
def conv_matrix(kernel: np.ndarray, h: int, w: int, padding: str) -> tuple[np.ndarray, np.ndarray]:
    """The stride-1 NHWC/HWIO convolution as a dense matrix ``M: (h·w·cin, ho·wo·cout)`` and its connectivity."""
    kh, kw, cin, cout = kernel.shape
    pt, pl = ((kh - 1) // 2, (kw - 1) // 2) if padding == "SAME" else (0, 0)
    ho, wo = (h, w) if padding == "SAME" else (h - kh + 1, w - kw + 1)
    m = np.zeros((h * w * cin, ho * wo * cout))
    s = np.zeros_like(m)
    for oy, ox, co, ky, kx, ci in itertools.product(range(ho), range(wo), range(cout), range(kh), range(kw),
                                                    range(cin)):
        iy, ix = oy + ky - pt, ox + kx - pl
        if 0 <= iy < h and 0 <= ix < w:
            i, j = (iy * w + ix) * cin + ci, (oy * wo + ox) * cout + co
            m[i, j] = kernel[ky, kx, ci, co]
            s[i, j] = 1.0
    return m, s


def _div(r, z):
    return np.where(z != 0, r / np.where(z != 0, z, 1.0), 0.0)


def _stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def reference(rule: rules.Rule, x, m, s, b, r, low=None, high=None) -> np.ndarray:
    """``R_i = Σ_j c_ij / z_j R_j`` with the rule's contributions ``c`` built explicitly (float64)."""
    c = x[:, None] * m
    cp, cn = np.maximum(c, 0), np.minimum(c, 0)
    if isinstance(rule, rules.Epsilon):
        return c @ _div(r, _stab(c.sum(0) + b, rule.epsilon))
    if isinstance(rule, rules.ZPlus) and not rule.sign_aware:
        cl = x[:, None] * np.maximum(m, 0)
        return cl @ _div(r, cl.sum(0))
    if isinstance(rule, rules.ZPlus):
        return cp @ _div(r, cp.sum(0))
    if isinstance(rule, rules.AlphaBeta):
        return rule.alpha * cp @ _div(r, cp.sum(0)) - rule.beta * cn @ _div(r, cn.sum(0))
    if isinstance(rule, rules.Gamma):
        g = c + rule.gamma * cp
        return g @ _div(r, _stab(g.sum(0) + b + rule.gamma * np.maximum(b, 0), rule.epsilon))
    if isinstance(rule, rules.Flat):
        return s @ _div(r, s.sum(0))
    if isinstance(rule, rules.WSquare):
        return (m * m) @ _div(r, (m * m).sum(0))
    if isinstance(rule, rules.ZBox):
        zb = x[:, None] * m - low[:, None] * np.maximum(m, 0) - high[:, None] * np.minimum(m, 0)
        return zb @ _div(r, zb.sum(0))
    raise AssertionError(rule)


ALL_RULES = [rules.Epsilon(0.1), rules.Epsilon(0.0), rules.ZPlus(), rules.ZPlus(sign_aware=False),
             rules.ALPHA2_BETA1, rules.ALPHA1_BETA0, rules.AlphaBeta(1.5, 0.5), rules.Gamma(0.25, 0.1), rules.Flat(),
             rules.WSquare(), rules.ZBox(-1.0, 1.0)]


def _rule_vjp(rule, op, x, w, b, r):
    return jax.vjp(lambda u: rules.linear(rule, op, u, w, b), x)[1](r)[0]


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_rule_matches_matrix_reference(rule, seed):
    rng = np.random.RandomState(seed)
    d_in, d_out = 7, 5
    x = rng.uniform(-1, 1, d_in)
    w, b, r = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out), rng.normal(size=d_out)
    got = _rule_vjp(rule, rules.DenseOp(), *(jnp.asarray(a, jnp.float32) for a in (x[None], w, b, r[None])))
    want = reference(rule, x, w, np.ones_like(w), b, r, np.full(d_in, -1.0), np.full(d_in, 1.0))
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_rule_matches_matrix_reference(rule, padding):
    rng = np.random.RandomState(3)
    h, w, cin, cout = 5, 5, 2, 3
    kernel = rng.normal(size=(3, 3, cin, cout))
    x = rng.uniform(-1, 1, (h, w, cin))
    m, s = conv_matrix(kernel, h, w, padding)
    ho = h if padding == "SAME" else h - 2
    b = rng.normal(size=cout)
    r = rng.normal(size=(ho, ho, cout))
    got = _rule_vjp(rule, rules.ConvOp(padding), *(jnp.asarray(a, jnp.float32)
                                                   for a in (x[None], kernel, b, r[None])))
    want = reference(rule, x.ravel(), m, s, np.tile(b, ho * ho), r.ravel(), np.full(x.size, -1.0),
                     np.full(x.size, 1.0))
    np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())


def test_zbox_per_channel_bounds_match_reference():
    rng = np.random.RandomState(4)
    kernel = rng.normal(size=(3, 3, 2, 2))
    low, high = (-0.5, 0.0), (0.5, 2.0)
    x = np.stack([rng.uniform(-0.5, 0.5, (4, 4)), rng.uniform(0, 2, (4, 4))], -1)
    m, s = conv_matrix(kernel, 4, 4, "SAME")
    r = rng.normal(size=(4, 4, 2))
    rule = rules.ZBox(low, high)
    got = _rule_vjp(rule, rules.ConvOp("SAME"), jnp.asarray(x[None], jnp.float32), jnp.asarray(kernel, jnp.float32),
                    jnp.zeros(2), jnp.asarray(r[None], jnp.float32))
    want = reference(rule, x.ravel(), m, s, 0.0, r.ravel(), np.tile(low, 16), np.tile(high, 16))
    np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=2e-4, atol=1e-5 * np.abs(want).max())


def test_rules_validate_hyperparameters():
    with pytest.raises(ValueError, match="alpha"):
        rules.AlphaBeta(2.0, 0.5)
    with pytest.raises(ValueError, match="epsilon"):
        rules.Epsilon(-1.0)
    with pytest.raises(ValueError, match="low"):
        rules.ZBox(1.0, 0.0)


# ----------------------------------------------------------------------------------------------- networks
def _init(model, shape, seed=0, zero_bias=False):
    v = models.init(model, jax.random.PRNGKey(seed), shape)
    if zero_bias:
        v = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.zeros_like(a) if getattr(p[-1], "key", "") == "bias" else a, v)
    return v


def _target_logit(rel):
    return np.asarray(rel.logits)[np.arange(len(rel.target)), np.asarray(rel.target)]


def _sums(a):
    return np.asarray(a).reshape(a.shape[0], -1).sum(1)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_zplus_conserves_relevance_in_bias_free_relu_mlp(seed):
    model = models.MLP((16, 12, 8, 4), use_bias=False)
    v = _init(model, (1, 6), seed)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (5, 6))
    rel = lrp.relevance(model, v, x, composite="zplus")
    logit = _target_logit(rel)
    ok = logit > 1e-3  # a negative winning logit has no positive contribution to share
    np.testing.assert_allclose(_sums(rel.input)[ok], logit[ok], rtol=1e-4)
    for name in ("dense_0", "dense_1", "dense_2"):
        np.testing.assert_allclose(_sums(rel.layers[name])[ok], logit[ok], rtol=1e-4)


def test_zplus_conserves_relevance_in_lenet5_without_biases():
    model = models.LeNet5(num_classes=3)
    v = _init(model, (1, 16, 16, 1), zero_bias=True)
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 1))
    rel = lrp.relevance(model, v, x, composite="zplus")
    logit = _target_logit(rel)
    assert np.all(logit > 0)
    for a in (rel.input, *rel.layers.values()):
        np.testing.assert_allclose(_sums(a), logit, rtol=1e-4)


def test_small_epsilon_approximately_conserves():
    model = models.MLP((32, 16, 3), use_bias=False)
    v = _init(model, (1, 4))
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 4))
    rel = lrp.relevance(model, v, x, composite=lrp.Epsilon(1e-4))
    np.testing.assert_allclose(_sums(rel.input), _target_logit(rel), rtol=1e-3, atol=1e-4)
    big = lrp.relevance(model, v, x, composite=lrp.Epsilon(10.0))  # a large ε absorbs relevance
    assert np.all(np.abs(_sums(big.input)) < np.abs(_target_logit(big)))


@pytest.mark.parametrize("model,shape", [(models.MLP((20, 10, 4)), (6, 5)),
                                         (models.LeNet5(num_classes=3), (2, 16, 16, 1)),
                                         (models.LeNet5(num_classes=3, pool="avg"), (2, 16, 16, 1))],
                         ids=["mlp", "lenet5-max", "lenet5-avg"])
def test_lrp0_equals_gradient_times_input(model, shape):
    v = _init(model, shape, seed=1)
    x = jax.random.uniform(jax.random.PRNGKey(3), shape)
    rel = lrp.relevance(model, v, x, composite=lrp.Epsilon(0.0))
    t = rel.target
    g = jax.grad(lambda u: jnp.sum(model.apply(v, u)[jnp.arange(shape[0]), t]))(x)
    np.testing.assert_allclose(np.asarray(rel.input), np.asarray(x * g), rtol=1e-3, atol=1e-5)


def _relevance_above_pool(model, v, x, rel, rule):
    """Relevance at the pooling output ``pool_1`` (the input of ``dense_0``, after flattening), from the rule of
    the layer after the pooling applied to the relevance the pass reports at ``dense_0``'s units."""
    pooled = np.asarray(models.representations(model, v, x)["pool_1"])  # (n, 2, 2, 16)
    p = v["params"]["dense_0"]
    above = rule.backward(rules.DenseOp(), jnp.asarray(pooled.reshape(len(pooled), -1)), p["kernel"], p["bias"],
                          rel.layers["dense_0"])
    return np.asarray(above).reshape(pooled.shape)


def test_max_pool_sends_relevance_to_the_winner():
    model = models.LeNet5(num_classes=3)
    v = _init(model, (1, 16, 16, 1))
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 16, 16, 1))
    rel = lrp.relevance(model, v, x, composite="zplus")
    reps = models.representations(model, v, x)
    below, above = np.asarray(rel.layers["conv_1"]), _relevance_above_pool(model, v, x, rel, rules.ZPlus())
    act = np.asarray(reps["conv_1"])
    n, h, w, c = below.shape  # (2, 4, 4, 16); above: (2, 2, 2, 16)
    win = below.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)
    a = act.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)
    np.testing.assert_allclose(win.sum(-1), above, rtol=1e-5, atol=1e-7)
    assert np.all((win != 0).sum(-1) <= 1)
    nz = win != 0
    np.testing.assert_array_equal(np.argmax(a, -1)[nz.any(-1)], np.argmax(nz, -1)[nz.any(-1)])


def test_avg_pool_redistributes_in_proportion():
    model = models.LeNet5(num_classes=3, pool="avg")
    v = _init(model, (1, 16, 16, 1))
    x = jax.random.uniform(jax.random.PRNGKey(6), (2, 16, 16, 1))
    rel = lrp.relevance(model, v, x, composite="zplus")
    act = np.asarray(models.representations(model, v, x)["conv_1"])
    above = _relevance_above_pool(model, v, x, rel, rules.ZPlus())
    share = act / np.repeat(np.repeat(act.reshape(2, 2, 2, 2, 2, 16).sum((2, 4)), 2, 1), 2, 2).clip(1e-30)
    want = share * np.repeat(np.repeat(above, 2, 1), 2, 2)
    np.testing.assert_allclose(np.asarray(rel.layers["conv_1"]), want, rtol=1e-4, atol=1e-7)


def test_relu_passes_relevance_for_flat_rule():
    """With a rule whose shares ignore activations, dead ReLU units still receive (and pass on) relevance."""
    model = models.MLP((6, 3), use_bias=False)
    v = _init(model, (1, 4))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
    rel = lrp.relevance(model, v, x, composite=composites.Composite(lrp.Flat()))
    np.testing.assert_allclose(np.asarray(rel.layers["dense_0"]),
                               np.repeat(_target_logit(rel)[:, None] / 6, 6, 1), rtol=1e-5)


def test_alpha1_beta0_equals_zplus():
    model = models.LeNet5(num_classes=3)
    v = _init(model, (1, 16, 16, 1))
    x = jax.random.uniform(jax.random.PRNGKey(7), (2, 16, 16, 1))
    a = lrp.relevance(model, v, x, composite=lrp.ALPHA1_BETA0)
    b = lrp.relevance(model, v, x, composite=lrp.ZPlus())
    np.testing.assert_allclose(np.asarray(a.input), np.asarray(b.input), rtol=1e-5, atol=1e-8)


def test_literal_zplus_differs_from_sign_aware_only_after_an_unrectified_layer():
    """Both forms agree wherever a layer's input is a ReLU output (and on non-negative network inputs); they part
    from the layer without ReLU downwards (the rule of the layer it feeds sees negative inputs)."""
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 5))
    for bug in ((), (1,)):
        model = models.MLP((16, 16, 16, 3), no_relu_after=bug)
        v = _init(model, (1, 5), seed=2)
        a = lrp.relevance(model, v, x, composite="zplus")
        b = lrp.relevance(model, v, x, composite="zplus_literal")
        same = ("dense_2",) if bug else ("input", "dense_0", "dense_1", "dense_2")
        for name in same:
            ra = a.input if name == "input" else a.layers[name]
            rb = b.input if name == "input" else b.layers[name]
            np.testing.assert_allclose(np.asarray(rb), np.asarray(ra), rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(a.layers["dense_1"]), np.asarray(b.layers["dense_1"]), rtol=1e-3)


# ----------------------------------------------------------------------------------------------- canonizer
def _random_bn(v, seed):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))

    def perturb(path, a):
        leaf = getattr(path[-1], "key", "")
        if leaf == "var":
            return jax.random.uniform(next(keys), a.shape, minval=0.5, maxval=2.0)
        if leaf in ("mean", "bias"):
            return jax.random.normal(next(keys), a.shape) * 0.3
        if leaf == "scale":
            return jax.random.uniform(next(keys), a.shape, minval=-1.5, maxval=1.5)
        return a

    return jax.tree_util.tree_map_with_path(perturb, v)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_batchnorm_folding_preserves_the_network_function():
    model = models.VGG((4, "M", 6, 6, "M"), num_classes=3)
    v = _random_bn(_init(model, (1, 4, 4, 2)), 0)
    before = jax.tree_util.tree_map(np.array, v)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2))
    folded = lrp.fold_batchnorm(model, v, x)
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(v)  # the same model's variables
    for i in range(3):  # every BatchNorm left as the identity plus the folded offset
        np.testing.assert_array_equal(folded["params"][f"bn_{i}"]["scale"], 1.0)
        np.testing.assert_array_equal(folded["batch_stats"][f"bn_{i}"]["mean"], 0.0)
        np.testing.assert_allclose(folded["batch_stats"][f"bn_{i}"]["var"], 1 - 1e-5, rtol=1e-7)
        g = v["params"][f"bn_{i}"]["scale"] / np.sqrt(v["batch_stats"][f"bn_{i}"]["var"] + 1e-5)
        np.testing.assert_allclose(folded["params"][f"conv_{i}"]["kernel"], v["params"][f"conv_{i}"]["kernel"] * g,
                                   rtol=1e-6)
        np.testing.assert_allclose(folded["params"][f"bn_{i}"]["bias"], v["params"][f"bn_{i}"]["bias"]
                                   - v["batch_stats"][f"bn_{i}"]["mean"] * g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(model.apply(folded, x)), np.asarray(model.apply(v, x)), rtol=1e-4,
                               atol=1e-5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, v))
    rel = lrp.relevance(model, v, x, composite="epsilon_alpha2_beta1")
    assert rel.input.shape == x.shape and list(rel.layers) == ["conv_0", "conv_1", "conv_2"]
    again = lrp.relevance(model, folded, x, composite="epsilon_alpha2_beta1")
    np.testing.assert_allclose(np.asarray(again.input), np.asarray(rel.input), rtol=1e-3, atol=1e-6)


def test_batchnorm_folding_needs_batch_stats():
    model = models.VGG((4, "M"), num_classes=2)
    v = _init(model, (1, 4, 4, 3))
    with pytest.raises(ValueError, match="variables: .*batch_stats"):
        lrp.fold_batchnorm(model, {"params": v["params"]}, jnp.ones((1, 4, 4, 3)))


# ----------------------------------------------------------------------------------------------- batching
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("model,shape", [(models.MLP((12, 8, 3)), (4, 5)),
                                         (models.ConvNet(2, 3), (3, 4, 4, 2))], ids=["mlp", "conv2"])
def test_batch_jit_and_vmap_agree(model, shape):
    v = _init(model, shape, seed=2)
    x = jax.random.uniform(jax.random.PRNGKey(8), shape)
    t = jnp.arange(shape[0]) % 3
    comp = composites.epsilon_plus(0.1)
    batch = lrp.relevance(model, v, x, composite=comp, target=t)
    per = jax.vmap(lambda xi, ti: lrp.relevance(model, v, xi[None], composite=comp, target=ti[None]).input[0])(x, t)
    jitted = jax.jit(lambda vv, xx: lrp.relevance(model, vv, xx, composite=comp, target=t))(v, x)
    np.testing.assert_allclose(np.asarray(per), np.asarray(batch.input), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jitted.input), np.asarray(batch.input), rtol=1e-4, atol=1e-6)
    loop = [lrp.relevance(model, v, x[i:i + 1], composite=comp, target=t[i:i + 1]).layers["dense_0"][0]
            for i in range(shape[0])]
    np.testing.assert_allclose(np.stack(loop), np.asarray(batch.layers["dense_0"]), rtol=1e-4, atol=1e-6)


def test_default_target_is_the_predicted_class():
    model = models.MLP((8, 4))
    v = _init(model, (1, 3))
    x = jax.random.normal(jax.random.PRNGKey(9), (6, 3))
    rel = lrp.relevance(model, v, x, composite="epsilon")
    np.testing.assert_array_equal(np.asarray(rel.target), np.argmax(np.asarray(model.apply(v, x)), -1))


# ----------------------------------------------------------------------------------------------- composites
def test_composite_assignment_by_role_kind_and_name():
    model = models.LeNet5()
    layers = graph.build(model, _init(model, (1, 28, 28, 1)), jnp.zeros((1, 28, 28, 1)))
    got = dict(composites.epsilon_gamma_box(-1.0, 1.0, epsilon=0.1, gamma=0.5).assign(layers))
    assert got == {"conv_0": rules.ZBox(-1.0, 1.0), "conv_1": rules.Gamma(0.5), "dense_0": rules.Epsilon(0.1),
                   "dense_1": rules.Epsilon(0.1), "dense_2": rules.Epsilon(0.1)}
    comp = composites.Composite.of(rules.Epsilon(), kinds={"conv": rules.ZPlus(), "output": rules.Flat()},
                                   names={"conv_1": rules.WSquare()})
    got = dict(comp.assign(layers))
    assert got["conv_0"] == rules.ZPlus() and got["conv_1"] == rules.WSquare() and got["dense_2"] == rules.Flat()
    with pytest.raises(ValueError, match="match no linear layer"):
        composites.Composite.of(names={"dense_9": rules.Flat()}).assign(layers)
    with pytest.raises(ValueError, match="kind"):
        composites.Composite.of(kinds={"pool": rules.Flat()})


def test_relevance_rejects_bad_input():
    model = models.MLP((8, 3))
    v = _init(model, (1, 4))
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="target"):
        lrp.relevance(model, v, x, composite="zplus", target=jnp.array([0, 3]))
    with pytest.raises(ValueError, match="target"):
        lrp.relevance(model, v, x, composite="zplus", target=jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="x:"):
        lrp.relevance(model, v, jnp.ones((2, 4), jnp.int32), composite="zplus")
    with pytest.raises(ValueError, match="composite"):
        lrp.relevance(model, v, x, composite="nope")
    with pytest.raises(ValueError, match="composite names \\['dense_9'\\] match no linear layer"):
        lrp.relevance(model, v, x, composite=composites.Composite.of(names={"dense_9": rules.Flat()}))


def test_relevance_refuses_a_non_finite_concrete_x():
    """NaN/Inf in ``x`` used to come back silently as NaN relevance; under jit/vmap the check is skipped."""
    model = models.MLP((8, 3))
    v = _init(model, (1, 4))
    x = np.ones((2, 4), np.float32)
    for bad, count, at in ((np.nan, 1, (1, 2)), (np.inf, 1, (1, 2)), (-np.inf, 1, (1, 2))):
        xb = x.copy()
        xb[at] = bad
        with pytest.raises(ValueError, match=rf"x: expected finite values, got {count} NaN/Inf entries "
                                             rf"\(first at index \(1, 2\): -?(nan|inf)\)"):
            lrp.relevance(model, v, jnp.asarray(xb), composite="epsilon")
    xb = x.copy()
    xb[0, 3] = xb[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"x: .*got 2 NaN/Inf entries \(first at index \(0, 3\)"):
        lrp.relevance(model, v, xb, composite="epsilon", target=0)  # a numpy x is checked too
    ok = lrp.relevance(model, v, x, composite="epsilon")
    assert np.isfinite(np.asarray(ok.input)).all()
    # traced: no concrete values to check, so the documented behaviour is NaN relevance, not an error
    traced = jax.jit(lambda xx: lrp.relevance(model, v, xx, composite="epsilon", target=0).input)(xb)
    assert np.isnan(np.asarray(traced)).any()


def test_rules_refuse_non_finite_hyperparameters():
    """NaN fails every comparison, so the range checks alone accepted it (AlphaBeta(nan, 1) gave NaN relevance)."""
    nan, inf = float("nan"), float("inf")
    for make, match in ((lambda: rules.AlphaBeta(nan, 1.0), "alpha"), (lambda: rules.AlphaBeta(2.0, nan), "beta"),
                        (lambda: rules.AlphaBeta(inf, inf), "alpha"), (lambda: rules.Epsilon(inf), "epsilon"),
                        (lambda: rules.Gamma(inf), "gamma"), (lambda: rules.Gamma(0.25, nan), "epsilon"),
                        (lambda: rules.ZBox(-inf, 1.0), "low"), (lambda: rules.ZBox(0.0, (1.0, nan)), "high")):
        with pytest.raises(ValueError, match=rf"{match}=.*finite"):
            make()
    assert rules.AlphaBeta(3.0, 2.0).alpha == 3.0 and rules.ZBox((0.0, -1.0), 1.0).low == (0.0, -1.0)


def test_relevance_names_x_and_zbox_bounds_for_wrong_shapes():
    mlp = models.MLP((4, 2))
    v = _init(mlp, (1, 3))
    with pytest.raises(ValueError, match=r"x: shape \(5, 7\) does not match the model's input.*'dense_0'"):
        lrp.relevance(mlp, v, jnp.ones((5, 7)), composite="epsilon")
    lenet = models.LeNet5(widths=(2, 3, 4, 5), num_classes=2)
    lv = _init(lenet, (1, 28, 28, 1))
    with pytest.raises(ValueError, match=r"x: shape \(2, 32, 32, 1\) does not match"):
        lrp.relevance(lenet, lv, jnp.ones((2, 32, 32, 1)), composite="epsilon")
    # per-channel box bounds for a (2, 2, 3) image fed to a dense first layer (12 inputs after flattening)
    mv = _init(mlp, (1, 2, 2, 3))
    x = jnp.full((2, 2, 2, 3), 0.5)
    with pytest.raises(ValueError, match=r"ZBox low=\(0.0, 0.0, 0.0\) on layer 'dense_0'.*12"):
        lrp.relevance(mlp, mv, x, composite=composites.epsilon_gamma_box((0.0,) * 3, (1.0,) * 3))
    r = lrp.relevance(mlp, mv, x, composite=composites.epsilon_gamma_box(0.0, 1.0), target=0)
    assert r.input.shape == (2, 2, 2, 3) and np.isfinite(np.asarray(r.input)).all()
