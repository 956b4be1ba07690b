"""Unit criteria against closed forms: column norms, parameter-gradient identities (∂L/∂b_j = Σ ∂L/∂z_j and
Σ z ∂L/∂z = Σ w ∂L/∂w + b ∂L/∂b for a linear layer), a hand-written z⁺ pass, and the global ranking."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import criteria, graph, models, structured


def _l1(v):
    return v / np.abs(v).sum()


def _l2(v):
    return v / np.sqrt((v * v).sum())


def test_weight_is_incoming_l1_per_unit():
    model = models.LeNet5(num_classes=3)
    v = models.init(model, jax.random.PRNGKey(0), (1, 16, 16, 1))
    s = criteria.scores("weight", model, v)
    assert set(s) == {"conv_0", "conv_1", "dense_0", "dense_1"}
    k = np.asarray(v["params"]["conv_1"]["kernel"])
    np.testing.assert_allclose(s["conv_1"], _l1(np.abs(k).sum((0, 1, 2))), rtol=1e-5)
    k = np.asarray(v["params"]["dense_0"]["kernel"])
    np.testing.assert_allclose(s["dense_0"], _l1(np.abs(k).sum(0)), rtol=1e-5)
    raw = criteria.scores("weight", model, v, normalized=False)
    np.testing.assert_allclose(raw["dense_0"], np.abs(k).sum(0), rtol=1e-5)


def test_weight_input_shape_given_or_inferred():
    """``weight`` reads only kernels; the graph's input shape is inferred (first square side that runs), or given
    as a shape tuple or an example batch — the scores are the same. A model no inferred shape runs on names x."""
    model = models.LeNet5(num_classes=3)
    v = models.init(model, jax.random.PRNGKey(0), (1, 16, 16, 1))
    assert graph.example_input(model, v).shape == (1, 16, 16, 1)
    inferred = criteria.weight(model, v)
    for x in ((1, 16, 16, 1), jnp.zeros((2, 17, 17, 1)), jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)):
        given = criteria.weight(model, v, x)
        assert list(given) == list(inferred) == ["conv_0", "conv_1", "dense_0", "dense_1"]
        for k in given:
            np.testing.assert_array_equal(given[k], inferred[k])

    class Sequences(nn.Module):  # reads (n, t, d): no (1, d) or image-shaped guess runs
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="head")(nn.relu(nn.Dense(4, name="fc")(x[:, 0, :])))

    sv = Sequences().init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match="x: could not infer an input shape"):
        criteria.scores("weight", Sequences(), sv)
    np.testing.assert_allclose(criteria.scores("weight", Sequences(), sv, jnp.zeros((1, 3, 5)), normalized=False)["fc"],
                               np.abs(np.asarray(sv["params"]["fc"]["kernel"])).sum(0), rtol=1e-6)


@pytest.fixture(scope="module")
def lenet():
    model = models.LeNet5(num_classes=4)
    v = models.init(model, jax.random.PRNGKey(1), (1, 16, 16, 1))
    x = jax.random.uniform(jax.random.PRNGKey(2), (6, 16, 16, 1))
    y = np.array([0, 1, 2, 3, 0, 1], np.int32)
    return model, v, x, y


def _param_grads(model, v, x, y):
    def loss(params):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y))

    return jax.grad(loss)(v["params"])


def test_grad_and_taylor_match_parameter_gradient_identities(lenet):
    model, v, x, y = lenet
    g = _param_grads(model, v, x, y)
    reps = models.representations(model, v, x)
    grad_s = criteria.scores("grad", model, v, x, y)
    taylor_s = criteria.scores("taylor", model, v, x, y)
    for name in ("conv_0", "conv_1", "dense_0", "dense_1"):
        positions = int(np.prod(reps[name].shape[:-1]))  # samples × spatial positions
        p, gp = v["params"][name], g[name]
        want_grad = np.abs(np.asarray(gp["bias"])) / positions
        euler = (np.asarray(p["kernel"] * gp["kernel"]).reshape(-1, p["kernel"].shape[-1]).sum(0)
                 + np.asarray(p["bias"] * gp["bias"]))
        want_taylor = np.abs(euler) / positions
        np.testing.assert_allclose(grad_s[name], _l2(want_grad), rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(taylor_s[name], _l2(want_taylor), rtol=2e-3, atol=1e-6)
        raw = criteria.grad(model, v, x, y, norm=None)[name]
        np.testing.assert_allclose(raw, want_grad, rtol=2e-3, atol=1e-9)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_grad_taylor_use_batchnorm_output_as_preactivation():
    model = models.VGG((4, "M", 4, "M"), num_classes=3)
    v = models.init(model, jax.random.PRNGKey(3), (1, 4, 4, 2))
    v["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.5, v["batch_stats"])
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 4, 4, 2))
    y = np.array([0, 1, 2, 0, 1], np.int32)
    g = jax.grad(lambda p: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p, "batch_stats": v["batch_stats"]}, x), y)))(v["params"])
    raw = criteria.grad(model, v, x, y, norm=None)
    np.testing.assert_allclose(raw["conv_1"], np.abs(np.asarray(g["bn_1"]["bias"])) / (5 * 2 * 2), rtol=2e-3,
                               atol=1e-8)


def test_lrp_scores_match_handwritten_zplus():
    model = models.MLP((7, 3))
    v = models.init(model, jax.random.PRNGKey(5), (1, 4))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (9, 4)), np.float64)
    y = np.arange(9) % 3
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    a = np.maximum(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0)
    logits = a @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    c = a * p["dense_1"]["kernel"][:, y].T  # (n, 7) contributions to the label's logit
    cp = np.maximum(c, 0)
    z = cp.sum(1, keepdims=True)
    r = np.where(z > 0, cp / np.where(z > 0, z, 1.0), 0.0) * logits[np.arange(9), y][:, None]
    got = criteria.scores("lrp", model, v, x.astype(np.float32), y.astype(np.int32), composite="zplus")
    np.testing.assert_allclose(got["dense_0"], _l1(r.sum(0)), rtol=1e-4, atol=1e-7)


def test_normalisations():
    v = jnp.array([3.0, -4.0])
    np.testing.assert_allclose(criteria.normalize(v, "l1"), [3 / 7, -4 / 7], rtol=1e-6)
    np.testing.assert_allclose(criteria.normalize(v, "l2"), [0.6, -0.8], rtol=1e-6)
    np.testing.assert_array_equal(criteria.normalize(jnp.zeros(3), "l1"), np.zeros(3))
    with pytest.raises(ValueError, match="norm"):
        criteria.normalize(v, "l3")


def test_global_keep_closed_form_and_ties():
    keep = criteria.global_keep({"a": jnp.array([0.1, 0.5, 0.2]), "b": jnp.array([0.3, 0.05])}, 2)
    assert {k: v.tolist() for k, v in keep.items()} == {"a": [1, 2], "b": [0]}
    keep = criteria.global_keep({"a": jnp.ones(2), "b": jnp.ones(2)}, 1)
    assert {k: v.tolist() for k, v in keep.items()} == {"a": [0, 1], "b": [0]}
    keep = criteria.global_keep({"a": jnp.zeros(3), "b": jnp.array([5.0, 6.0])}, 3)
    assert {k: v.tolist() for k, v in keep.items()} == {"a": [0], "b": [1]}
    with pytest.raises(ValueError, match="n_remove"):
        criteria.global_keep({"a": jnp.zeros(3), "b": jnp.array([5.0])}, 3)


@settings(max_examples=20, deadline=None)
@given(vals=st.lists(st.integers(0, 3), min_size=2, max_size=12), data=st.data())
def test_single_layer_global_keep_equals_select_by_scores(vals, data):
    s = jnp.asarray(vals, jnp.float32)
    n_remove = data.draw(st.integers(0, len(vals) - 1))
    got = criteria.global_keep({"l": s}, n_remove)["l"]
    np.testing.assert_array_equal(got, structured.select_by_scores(s, len(vals) - n_remove))


def test_scores_plug_into_physical_removal(lenet):
    model, v, x, y = lenet
    s = criteria.scores("lrp", model, v, x, y)
    keep = criteria.global_keep(s, 100)
    small, sv = structured.remove_many(model, v, keep)
    assert sum(int(k.shape[0]) for k in keep.values()) == 6 + 16 + 120 + 84 - 100
    assert small.apply(sv, x).shape == (6, 4)


def test_criteria_validate_input(lenet):
    model, v, x, y = lenet
    with pytest.raises(ValueError, match="criterion"):
        criteria.scores("magnitude", model, v, x, y)
    with pytest.raises(ValueError, match="y:"):
        criteria.scores("grad", model, v, x, y[:3])
    with pytest.raises(ValueError, match="y:"):
        criteria.scores("taylor", model, v, x, y + 4)
    with pytest.raises(ValueError, match="reference batch"):
        criteria.scores("grad", model, v)


def test_non_finite_scores_raise_naming_the_layer():
    """One NaN parameter used to normalise to an all-zero layer (so select_by_scores kept units 0, 1, …)."""
    model = models.MLP((4, 3, 2))
    v = models.init(model, jax.random.PRNGKey(0), (1, 3))
    bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), v)
    x, y = jax.random.normal(jax.random.PRNGKey(1), (5, 3)), np.array([0, 1, 1, 0, 1], np.int32)
    for crit in criteria.YEOM:
        for normalized in (True, False):
            with pytest.raises(ValueError, match=rf"{crit} scores of layer 'dense_0'.*NaN or infinite"):
                criteria.scores(crit, model, bad, x, y, normalized=normalized)
    with pytest.raises(ValueError, match="NaN or infinite"):
        criteria.normalize(jnp.array([1.0, jnp.inf]), "l2")
    # traced (under jit) there is nothing to raise: the NaN propagates instead of becoming zeros
    assert np.isnan(np.asarray(jax.jit(lambda s: criteria.normalize(s, "l1"))(jnp.array([1.0, jnp.nan])))).all()
    # NaN used to sort as the largest score, so a NaN unit was never removed
    with pytest.raises(ValueError, match=r"scores\['a'\].*NaN"):
        criteria.global_keep({"a": jnp.array([1.0, jnp.nan, 2.0]), "b": jnp.ones(2)}, 1)
    np.testing.assert_array_equal(criteria.normalize(jnp.zeros(2), "l2"), np.zeros(2))


def test_wrong_input_shape_names_x(lenet):
    model, v, x, y = lenet  # built for 16×16 inputs
    mlp = models.MLP((4, 2))
    mv = models.init(mlp, jax.random.PRNGKey(0), (1, 3))
    with pytest.raises(ValueError, match=r"x: shape \(5, 7\) does not match the model's input.*'dense_0'"):
        criteria.grad(mlp, mv, jnp.ones((5, 7)), np.zeros(5, np.int32))
    for crit in ("taylor", "lrp"):
        with pytest.raises(ValueError, match=r"x: shape \(6, 20, 20, 1\) does not match the model's input"):
            criteria.scores(crit, model, v, jnp.ones((6, 20, 20, 1)), y)


# ----------------------------------------------------------------------------------------------- token ids
class _TokenTagger(nn.Module):
    """ids (n, t) → embedding (11, 6) → 2-head self-attention (heads of 2) + residual → dense 5 'mix' → tanh →
    mean over tokens → dense 3."""

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(11, 6, name="table")(ids)
        e = e + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, name="att")(e, e)
        return nn.Dense(3, name="read")(jnp.tanh(nn.Dense(5, name="mix")(e)).mean(axis=1))


def _tagger_by_hand(p, ids, y):
    """``(z, ∂L/∂z)`` at 'mix' in float64: the forward written from the layers' formulas, L = Σ CE."""
    e = p["table"]["embedding"][ids]
    a = p["att"]
    q, k, v = (jnp.einsum("ntd,dhc->nthc", e, a[n]["kernel"]) + a[n]["bias"] for n in ("query", "key", "value"))
    w = jax.nn.softmax(jnp.einsum("nqhc,nkhc->nhqk", q / jnp.sqrt(2.0), k), axis=-1)
    e = e + jnp.einsum("nqhc,hcf->nqf", jnp.einsum("nhqk,nkhc->nqhc", w, v), a["out"]["kernel"]) + a["out"]["bias"]
    z = e @ p["mix"]["kernel"] + p["mix"]["bias"]

    def loss(z):
        logits = jnp.tanh(z).mean(axis=1) @ p["read"]["kernel"] + p["read"]["bias"]
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    return z, jax.grad(loss)(z)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_grad_and_taylor_take_token_ids_and_equal_a_float64_forward_by_hand():
    model = _TokenTagger()
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 5), 0, 11)
    y = np.array([0, 2, 1, 2], np.int32)
    v = model.init(jax.random.PRNGKey(2), ids)
    s = {c: criteria.scores(c, model, v, ids, y, normalized=False) for c in ("grad", "taylor")}
    assert {k: np.shape(a) for k, a in s["taylor"].items()} == {"att/query": (2,), "att/key": (2,),
                                                                "att/value": (2,), "att/out": (6,), "mix": (5,)}
    assert all(np.isfinite(a).all() for c in s.values() for a in c.values())
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v["params"])
        z, dz = _tagger_by_hand(p, ids, y)
        want_grad, want_taylor = np.abs(dz.mean(axis=(0, 1))), np.abs((z * dz).mean(axis=(0, 1)))
    np.testing.assert_allclose(s["grad"]["mix"], want_grad, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(s["taylor"]["mix"], want_taylor, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("x, y, match", [
    (np.array([[1, -1, 2]] * 2), [0, 1], r"x: integer token ids must lie in \[0, 11\), got range \[-1, 2\]"),
    (np.array([[1, 11, 2]] * 2), [0, 1], r"x: integer token ids must lie in \[0, 11\), got range \[1, 11\]"),
    (np.array([1, 2, 3]), [0, 1, 2], r"x: expected a non-empty float or integer token-id reference batch"),
    (np.array([[1, 2, 3]] * 2), np.array([0.0, np.nan]), r"y: expected int labels of shape \(2,\)"),
])
def test_token_id_batches_are_checked(x, y, match):
    model = _TokenTagger()
    v = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=match):
        criteria.scores("taylor", model, v, x, y)
    if x.ndim == 2 and x.min() >= 0 and x.max() < 11:  # LRP still needs a float input
        with pytest.raises(ValueError, match="x: expected a non-empty float reference batch"):
            criteria.scores("lrp", model, v, x, np.array([0, 1]))
