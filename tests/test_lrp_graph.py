"""LRP and the unit criteria on models a user brings (tests/user_models.py: linen and NNX), read from the graph.

References are independent of :mod:`jaxprune.graph`: gradients through the model itself (``jax.grad`` of its own
``apply``, with perturbations added at the pre-activations through ``flax.linen.intercept_methods``, or a
hand-written forward for the NNX model), float64 matrix-form rules (tests/test_lrp.py) chained by hand, and
conservation on constructions where it must hold exactly.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import user_models as um
from test_lrp import reference
from jaxprune import criteria, graph, lrp, models
from jaxprune.lrp import composites, rules

HIDDEN = {  # every non-output linear layer, forward order
    "plain_mlp": ["fc1", "fc2"],
    "strided_bn": ["stem", "mid", "fc"],
    "residual": ["entry", "block1/conv_a", "block1/conv_b", "block2/conv_a", "block2/conv_b"],
    "nested": ["encoder/lin0", "encoder/lin1", "decoder/lin0"],
    "nnx": ["conv", "hidden"],
}
PROBE_AT = {"strided_bn": {"stem": "stem_norm", "mid": "mid_norm"}}  # module whose output is the pre-activation
EPS = {"stem_norm": 1e-5, "mid_norm": 1e-3, "norm": 1e-5}
NAMES = [n for n, _, _ in um.LINEN] + ["nnx"]
LINEN = {n: (m, s) for n, m, s in um.LINEN}


# ----------------------------------------------------------------------------------------------- helpers
def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None) != "value"]


def _leaves(variables) -> dict[tuple[str, str], np.ndarray]:
    """``{(module path, leaf name): array}``."""
    out = {}
    for path, a in jax.tree_util.tree_leaves_with_path(variables):
        keys = _keys(path)
        keys = keys[1:] if keys[0] in ("params", "batch_stats") else keys
        out["/".join(keys[:-1]), keys[-1]] = np.asarray(a)
    return out


def _map(variables, fn):
    """``fn(module path, leaf name, array)`` over every leaf (linen collections and NNX states alike)."""
    def f(path, a):
        keys = _keys(path)
        if keys[0] in ("params", "batch_stats"):
            keys = keys[1:]
        return fn("/".join(keys[:-1]), keys[-1], a)

    return jax.tree_util.tree_map_with_path(f, variables)


def _nnx_stats(state, seed=0):
    """Non-trivial BatchNorm statistics and scales for the NNX model (nnx's initial ones are the identity)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 7), 8))

    def f(mod, leaf, a):
        if mod != "norm":
            return a
        u = jax.random.uniform(next(keys), a.shape)
        return {"mean": 0.3 * (u - 0.5), "var": 0.5 + u, "scale": 0.7 + 0.6 * u, "bias": 0.2 * (u - 0.5)}[leaf]

    return _map(state, f)


def setup(name: str, seed: int = 0):
    """``(model, variables, apply(variables, x), x shape)``; ``model`` is the NNX graphdef for ``"nnx"``."""
    if name == "nnx":
        gd, st = nnx.split(um.nnx_model(seed))
        return gd, _nnx_stats(st, seed), lambda s, x: nnx.merge(gd, s)(x), (2, 6, 6, 3)
    model, shape = LINEN[name]
    return model, um.init(model, shape, seed), model.apply, shape


def plain(variables, *, bn: str = "identity"):
    """Zero biases; BatchNorm as the identity (scale 1, bias 0, mean 0, var 1 - eps) or, ``bn="scaled"``, with
    its scale and variance kept (a pure per-channel scale, still no offset)."""
    def f(mod, leaf, a):
        if leaf == "bias" or leaf == "mean":
            return jnp.zeros_like(a)
        if bn == "identity" and leaf == "scale":
            return jnp.ones_like(a)
        if bn == "identity" and leaf == "var":
            return jnp.full_like(a, 1 - EPS[mod])
        return a

    return _map(variables, f)


def anchored(variables):
    """Signed kernels except input channel 0 of every layer and every weight into output unit 0, made positive:
    with positive inputs, unit 0 of every layer is positive everywhere, so every z⁺ denominator is positive."""
    def f(mod, leaf, a):
        if leaf != "kernel":
            return a
        a = a.at[..., 0, :].set(jnp.abs(a[..., 0, :]))
        return a.at[..., 0].set(jnp.abs(a[..., 0]) + 0.05)

    return _map(variables, f)


def _nnx_forward(gd, st, x, probes):
    """The NNX model by hand, ``probes`` added at its two hidden pre-activations; ``(logits, {layer: z})``."""
    m = nnx.merge(gd, st)
    z1 = m.norm(m.conv(x)) + probes["conv"]
    h = nnx.avg_pool(nnx.relu(z1), (2, 2), strides=(2, 2))
    z2 = m.hidden(h.reshape((h.shape[0], -1))) + probes["hidden"]
    return m.head(nnx.relu(z2)), {"conv": z1, "hidden": z2}


def _linen_forward(model, v, x, probes, at):
    """``model.apply`` with ``probes[layer]`` added to the output of module ``at[layer]``; ``(logits, {layer: z})``."""
    where = {at.get(k, k): k for k in probes}
    seen = {}

    def icpt(f, args, kwargs, context):
        out = f(*args, **kwargs)
        layer = where.get("/".join(context.module.path))
        if context.method_name == "__call__" and layer is not None:
            out = out + probes[layer]
            seen[layer] = out
        return out

    with nn.intercept_methods(icpt):
        logits = model.apply(v, x)
    return logits, seen


def forward_with_probes(name, model, v, x, probes):
    if name == "nnx":
        return _nnx_forward(model, v, x, probes)
    return _linen_forward(model, v, x, probes, PROBE_AT.get(name, {}))


def preactivation_grads(name, model, v, x, loss):
    """``({layer: z}, {layer: ∂loss(logits)/∂z})`` through the model itself (not the graph)."""
    shapes = jax.eval_shape(lambda: forward_with_probes(name, model, v, x, {k: 0.0 for k in HIDDEN[name]})[1])
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    g, z = jax.grad(lambda p: (lambda out: (loss(out[0]), out[1]))(forward_with_probes(name, model, v, x, p)),
                    has_aux=True)(zeros)
    return z, g


def _logit(rel):
    return np.asarray(rel.logits)[np.arange(len(rel.target)), np.asarray(rel.target)]


def _sums(a):
    return np.asarray(a, np.float64).reshape(a.shape[0], -1).sum(1)


def _close(got, want, rtol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-12))


# ----------------------------------------------------------------------------------------------- LRP-0 = grad × input
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("bn", ["identity", "scaled"])
@pytest.mark.parametrize("name", NAMES)
def test_lrp0_equals_gradient_times_input_at_every_layer(name, bn):
    """Zero biases and offset-free BatchNorm: LRP-ε at ε = 0 is z · ∂f/∂z at the input and every layer (residual
    adds, strided convs, max/avg pooling, global means included), with f the target logit."""
    model, v, apply, shape = setup(name)
    v = plain(v, bn=bn)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    rel = lrp.relevance(model, v, x, composite=lrp.Epsilon(0.0))
    assert list(rel.layers) == HIDDEN[name]
    t = np.asarray(rel.target)
    np.testing.assert_array_equal(t, np.argmax(np.asarray(apply(v, x)), -1))
    f = lambda logits: jnp.sum(logits[jnp.arange(shape[0]), t])  # noqa: E731
    gx = jax.grad(lambda u: f(apply(v, u)))(x)
    _close(rel.input, x * gx)
    z, g = preactivation_grads(name, model, v, x, f)
    for k in HIDDEN[name]:
        _close(rel.layers[k], z[k] * g[k])


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_lrp0_on_the_library_resnet():
    """jaxprune.models.ResNet (strided 1×1 shortcut convs with BatchNorm, residual adds) was refused before the
    graph; with zero offsets LRP-0 is gradient × input."""
    model = models.ResNet(8, num_classes=3, width=4)
    v = models.init(model, jax.random.PRNGKey(0), (2, 8, 8, 3))
    v = _map(v, lambda mod, leaf, a: jnp.zeros_like(a) if leaf in ("bias", "mean") else
             (0.5 + jax.random.uniform(jax.random.PRNGKey(len(mod)), a.shape)) if leaf in ("var", "scale") else a)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
    rel = lrp.relevance(model, v, x, composite=lrp.Epsilon(0.0), target=1)
    gx = jax.grad(lambda u: jnp.sum(model.apply(v, u)[:, 1]))(x)
    _close(rel.input, x * gx)
    assert "dense" not in rel.layers and "block1_0/shortcut_conv" in rel.layers


# ----------------------------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("name", NAMES)
def test_zplus_conserves_relevance_exactly(name):
    """Non-negative inputs, no biases or offsets, kernels anchored so every z⁺ denominator is positive: the
    relevance at the input, and at every cut of the network, sums to the target logit (whatever its sign)."""
    model, v, _, shape = setup(name, seed=3)
    v = anchored(plain(v, bn="scaled"))
    x = jax.random.uniform(jax.random.PRNGKey(4), shape, minval=0.05, maxval=1.0)
    rel = lrp.relevance(model, v, x, composite="zplus", target=0)
    logit = _logit(rel)
    _close(_sums(rel.input), logit, 1e-5)
    if name == "residual":  # shares through both branches of each block; the stem before them holds it all
        _close(_sums(rel.layers["entry"]), logit, 1e-5)
        for b in ("block1", "block2"):
            _close(_sums(rel.layers[f"{b}/conv_a"]), _sums(rel.layers[f"{b}/conv_b"]), 1e-5)
            assert np.all(np.abs(_sums(rel.layers[f"{b}/conv_b"]) - logit) > 1e-3 * np.abs(logit))
    else:
        for k in HIDDEN[name]:
            _close(_sums(rel.layers[k]), logit, 1e-5)


def test_residual_add_shares_relevance_in_proportion():
    """At ``relu(x + y)`` the branch ``y`` (block2/conv_b) gets ``y / (x + y)`` of the relevance there, the
    shortcut the rest (conserved, not doubled); that relevance comes from the head's z⁺ rule and the global mean's
    proportional rule, recomputed here from the model's own intermediates."""
    model, shape = LINEN["residual"]
    v = um.init(model, shape, seed=5)
    x = jax.random.uniform(jax.random.PRNGKey(6), shape)
    rel = lrp.relevance(model, v, x, composite="zplus")
    got = {}

    def icpt(f, args, kwargs, context):
        out = f(*args, **kwargs)
        got["/".join(context.module.path)] = out
        return out

    with nn.intercept_methods(icpt):
        logits = model.apply(v, x)
    short, y, a = (np.asarray(got[k], np.float64) for k in ("block1", "block2/conv_b", "block2"))
    m = a.mean((1, 2))
    p = v["params"]["out"]
    r_out = np.asarray(jax.nn.one_hot(rel.target, 3) * logits, np.float64)
    r_m = np.stack([reference(rules.ZPlus(), m[i], np.asarray(p["kernel"], np.float64), None, 0.0, r_out[i])
                    for i in range(shape[0])])
    r_a = a * np.where(m > 0, r_m / np.where(m > 0, m, 1.0), 0.0)[:, None, None, :] / (a.shape[1] * a.shape[2])
    s = short + y
    share = np.where(s > 0, y / np.where(s > 0, s, 1.0), 0.0)
    _close(rel.layers["block2/conv_b"], share * r_a, 1e-4)
    np.testing.assert_allclose(r_a.sum((1, 2, 3)), _logit(rel), rtol=1e-4)  # the reference itself conserves


# ----------------------------------------------------------------------------------------------- composites
def test_composite_by_path_name_matches_the_float64_chain():
    """PlainMLP with biases and one rule per layer path: the relevance at every layer and the input equals the
    matrix-form rules of tests/test_lrp.py chained by hand in float64."""
    model, shape = LINEN["plain_mlp"]
    v = um.init(model, shape, seed=2)
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), shape, minval=-1, maxval=1), np.float64)
    comp = composites.Composite.of(lrp.Epsilon(0.05), names={"fc1": rules.ZBox(-1.0, 1.0),
                                                             "fc2": rules.ALPHA2_BETA1, "head": rules.Gamma(0.25, 0.1)})
    rel = lrp.relevance(model, v, jnp.asarray(x, jnp.float32), composite=comp)
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v["params"].items()}
    a0 = x.reshape(shape[0], -1)
    a1 = np.maximum(a0 @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    a2 = np.maximum(a1 @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
    logits = a2 @ p["head"]["kernel"] + p["head"]["bias"]
    t = np.asarray(rel.target)
    np.testing.assert_array_equal(t, logits.argmax(-1))
    r3 = np.eye(4)[t] * logits
    r2, r1, r0 = [], [], []
    for i in range(shape[0]):
        r2.append(reference(rules.Gamma(0.25, 0.1), a2[i], p["head"]["kernel"], None, p["head"]["bias"], r3[i]))
        r1.append(reference(rules.ALPHA2_BETA1, a1[i], p["fc2"]["kernel"], None, p["fc2"]["bias"], r2[-1]))
        r0.append(reference(rules.ZBox(-1.0, 1.0), a0[i], p["fc1"]["kernel"], None, p["fc1"]["bias"], r1[-1],
                            np.full(10, -1.0), np.full(10, 1.0)))
    _close(rel.layers["fc2"], np.stack(r2))
    _close(rel.layers["fc1"], np.stack(r1))
    _close(np.asarray(rel.input).reshape(shape[0], -1), np.stack(r0))


def test_composite_by_kind_and_role_on_a_batchnorm_cnn():
    """StridedBNNet with z⁺ for convolutions and ε for dense layers: the assignment, then the relevance at ``fc``
    and ``mid`` (ε rules of the dense layers, float64) and at ``stem`` (``mid``'s z⁺ rule through its padding
    and BatchNorm, then the max pooling's winner-takes-all), recomputed from the model's own intermediates."""
    model, shape = LINEN["strided_bn"]
    v = um.init(model, shape, seed=1)
    g = graph.build(model, v, jnp.zeros(shape))
    comp = composites.Composite.of(rules.Flat(), kinds={"conv": rules.ZPlus(), "dense": rules.Epsilon(0.2)})
    assert dict(comp.assign(g)) == {"stem": rules.ZPlus(), "mid": rules.ZPlus(), "fc": rules.Epsilon(0.2),
                                    "logits": rules.Epsilon(0.2)}
    by_role = composites.Composite.of(rules.Flat(), kinds={"input": rules.WSquare(), "output": rules.Gamma(),
                                                           "conv": rules.ZPlus()})
    assert dict(by_role.assign(g)) == {"stem": rules.WSquare(), "mid": rules.ZPlus(), "fc": rules.Flat(),
                                       "logits": rules.Gamma()}
    x = jax.random.uniform(jax.random.PRNGKey(2), shape)
    rel = lrp.relevance(model, v, x, composite=comp)
    got = {}

    def icpt(f, args, kwargs, context):
        out = f(*args, **kwargs)
        got["/".join(context.module.path)] = out
        return out

    with nn.intercept_methods(icpt):
        logits = model.apply(v, x)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    p = {k: {n: f64(a) for n, a in d.items()} for k, d in v["params"].items()}
    a_fc = np.maximum(f64(got["fc"]), 0)
    a_mid = np.maximum(f64(got["mid_norm"]), 0)
    n = shape[0]
    r_out = f64(jax.nn.one_hot(rel.target, 3) * logits)
    eps = rules.Epsilon(0.2)
    r_fc = np.stack([reference(eps, a_fc[i], p["logits"]["kernel"], None, p["logits"]["bias"], r_out[i])
                     for i in range(n)])
    r_mid = np.stack([reference(eps, a_mid[i].ravel(), p["fc"]["kernel"], None, p["fc"]["bias"], r_fc[i])
                      for i in range(n)]).reshape(a_mid.shape)
    _close(rel.layers["fc"], r_fc)
    _close(rel.layers["mid"], r_mid)
    # mid: z⁺ of its BatchNorm-scaled kernel (a positive per-channel scale: the shares are those of its kernel)
    act = nn.relu(got["stem_norm"])
    pooled = nn.max_pool(act, (2, 2), strides=(2, 2))
    r_pool = rules.ZPlus().backward(rules.ConvOp(((1, 1), (0, 2))), pooled, v["params"]["mid"]["kernel"],
                                    jnp.zeros(5), jnp.asarray(r_mid, jnp.float32))
    r_stem = jax.vjp(lambda u: nn.max_pool(u, (2, 2), strides=(2, 2)), act)[1](r_pool)[0]
    _close(rel.layers["stem"], r_stem, 2e-4)


def test_composite_naming_a_missing_layer_is_refused():
    model, shape = LINEN["residual"]
    v = um.init(model, shape)
    x = jnp.ones(shape)
    comp = composites.Composite.of(names={"block3/conv_a": rules.Flat(), "block1/conv_a": rules.Flat()})
    with pytest.raises(ValueError, match=r"composite names \['block3/conv_a'\] match no linear layer; the model "
                                         r"has \['entry', 'block1/conv_a'"):
        lrp.relevance(model, v, x, composite=comp)
    with pytest.raises(ValueError, match="kind"):
        composites.Composite.of(kinds={"block1": rules.Flat()})


# ----------------------------------------------------------------------------------------------- BatchNorm folding
class BareNormNet(nn.Module):
    """A bias-free dense layer, then a BatchNorm with neither scale nor bias (the offset has to go to ``mean``)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, use_bias=False, name="fc")(x)
        x = nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False, name="norm")(x)
        return nn.Dense(3, name="head")(nn.relu(x))


@pytest.mark.parametrize("name", ["strided_bn", "nnx", "bare"])
def test_fold_batchnorm_keeps_the_function_and_the_relevance(name):
    if name == "bare":
        model, shape = BareNormNet(), (4, 5)
        v, apply = um.init(model, shape, seed=1), model.apply
    else:
        model, v, apply, shape = setup(name, seed=1)
    x = jax.random.normal(jax.random.PRNGKey(8), shape)
    before = jax.tree_util.tree_map(np.array, v)
    folded = lrp.fold_batchnorm(model, v, x)
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(v)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, v))
    _close(apply(folded, x), apply(v, x), 1e-5)
    leaves = _leaves(folded)
    norms = {"strided_bn": {"stem_norm": None, "mid_norm": "mid"}, "nnx": {"norm": "conv"},
             "bare": {"norm": None}}[name]
    for norm, biased in norms.items():
        if (norm, "scale") in leaves:
            np.testing.assert_array_equal(leaves[norm, "scale"], 1.0)
        np.testing.assert_allclose(leaves[norm, "var"], 1 - EPS.get(norm, 1e-5), rtol=1e-7)
        if name == "bare":
            assert np.abs(leaves[norm, "mean"]).max() > 0  # the offset −mean·a lives in mean
        else:
            np.testing.assert_array_equal(leaves[norm, "mean"], 0.0)
        if biased:  # the layer's own bias moved into the BatchNorm's
            np.testing.assert_array_equal(leaves[biased, "bias"], 0.0)
    twice = lrp.fold_batchnorm(model, folded, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), folded, twice)
    for comp in ("epsilon_plus", "zplus", composites.Composite(rules.Gamma(0.5))):
        a = lrp.relevance(model, v, x, composite=comp)
        b = lrp.relevance(model, folded, x, composite=comp)
        _close(b.input, a.input, 1e-4)
        for k in a.layers:
            _close(b.layers[k], a.layers[k], 1e-4)


# ----------------------------------------------------------------------------------------------- refusals
class GatedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(6, name="value")(x))
        g = nn.sigmoid(nn.Dense(6, name="gate")(x))
        return nn.Dense(3, name="out")(h * g)


class SoftmaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.softmax(nn.Dense(6, name="attn")(x), axis=-1)
        return nn.Dense(3, name="out")(h)


@pytest.mark.parametrize("model,match", [
    (GatedNet(), r"LRP cannot propagate through mul of two activations \(a product or gate\) after layer 'gate'"),
    (SoftmaxNet(), r"LRP cannot propagate through reduce_max over the channel axis after layer 'attn'")],
    ids=["product", "softmax"])
def test_unsupported_operations_are_named_with_their_layer(model, match):
    v = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    with pytest.raises(graph.UnsupportedError, match=match):
        lrp.relevance(model, v, jnp.ones((2, 4)), composite="epsilon")
    s = criteria.scores("taylor", model, v, jnp.ones((2, 4)), np.array([0, 1], np.int32))  # gradients are fine
    assert set(s) == set(lrp.non_output_layers(graph.build(model, v, jnp.ones((2, 4)))))


def test_wrong_inputs_name_x_and_the_failing_layer():
    model, shape = LINEN["nested"]
    v = um.init(model, shape)
    with pytest.raises(ValueError, match=r"x: shape \(3, 9\) does not match the model's input \(the forward pass "
                                         r"fails in layer 'encoder/lin0', kernel \(7, 10\)\)"):
        lrp.relevance(model, v, jnp.ones((3, 9)), composite="epsilon")
    gd, st, _, shape = setup("nnx")
    with pytest.raises(ValueError, match=r"x: shape \(2, 8, 8, 3\) does not match the model's input"):
        criteria.scores("grad", gd, st, jnp.ones((2, 8, 8, 3)), np.zeros(2, np.int32))


# ----------------------------------------------------------------------------------------------- batching, NNX forms
@pytest.mark.parametrize("name", ["residual", "nnx"])
def test_batch_jit_vmap_and_nnx_module_agree(name):
    model, v, _, shape = setup(name, seed=4)
    x = jax.random.uniform(jax.random.PRNGKey(9), shape)
    t = jnp.arange(shape[0]) % 3
    comp = composites.epsilon_plus(0.1)
    batch = lrp.relevance(model, v, x, composite=comp, target=t)
    per = jax.vmap(lambda xi, ti: lrp.relevance(model, v, xi[None], composite=comp, target=ti[None]).input[0])(x, t)
    jitted = jax.jit(lambda vv, xx: lrp.relevance(model, vv, xx, composite=comp, target=t))(v, x)
    _close(per, batch.input)
    _close(jitted.input, batch.input)
    for k in HIDDEN[name]:
        _close(jitted.layers[k], batch.layers[k])
    if name == "nnx":  # an nnx.Module itself (split inside)
        m = nnx.merge(model, v)
        direct = lrp.relevance(m, None, x, composite=comp, target=t)
        _close(direct.input, batch.input)


# ----------------------------------------------------------------------------------------------- criteria
def _kernel(v, layer):
    return _leaves(v)[layer, "kernel"]


@pytest.mark.parametrize("name", NAMES)
def test_criteria_on_every_user_model(name):
    model, v, apply, shape = setup(name, seed=6)
    x = jax.random.normal(jax.random.PRNGKey(10), shape)
    y = np.arange(shape[0], dtype=np.int32) % 3
    layers = HIDDEN[name]
    # weight: incoming L1 norm from the kernel (output axis last), with the input shape inferred or given
    w = criteria.scores("weight", model, v, normalized=False)
    assert list(w) == layers
    for k in layers:
        kern = _kernel(v, k)
        np.testing.assert_allclose(w[k], np.abs(kern).reshape(-1, kern.shape[-1]).sum(0), rtol=1e-5)
    wn = criteria.scores("weight", model, v, x, y)
    for k in layers:
        np.testing.assert_allclose(wn[k], w[k] / np.abs(w[k]).sum(), rtol=1e-5)
    # grad / taylor: against ∂L/∂z through the model itself (probes at the pre-activations, after BatchNorm)
    loss = lambda logits: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)))  # noqa
    z, g = preactivation_grads(name, model, v, x, loss)
    gs = criteria.scores("grad", model, v, x, y, normalized=False)
    ts = criteria.scores("taylor", model, v, x, y, normalized=False)
    gn = criteria.scores("grad", model, v, x, y)
    assert list(gs) == list(ts) == layers
    for k in layers:
        want_g = np.abs(np.asarray(g[k]).reshape(-1, g[k].shape[-1]).mean(0))
        want_t = np.abs(np.asarray(z[k] * g[k]).reshape(-1, g[k].shape[-1]).mean(0))
        _close(gs[k], want_g, 1e-4)
        _close(ts[k], want_t, 1e-4)
        _close(gn[k], want_g / np.sqrt((want_g ** 2).sum()), 1e-4)
    # lrp: relevance summed over samples and positions, L1-normalised
    ls = criteria.scores("lrp", model, v, x, y, composite="epsilon_plus")
    rel = lrp.relevance(model, v, x, composite="epsilon_plus", target=jnp.asarray(y))
    assert list(ls) == layers
    for k in layers:
        r = np.asarray(rel.layers[k], np.float64).reshape(-1, rel.layers[k].shape[-1]).sum(0)
        _close(ls[k], r / np.abs(r).sum(), 1e-5)
    keep = criteria.global_keep(ls, 3)
    assert sum(len(keep[k]) for k in layers) == sum(len(ls[k]) for k in layers) - 3
