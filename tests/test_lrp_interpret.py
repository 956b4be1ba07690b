"""AttnLRP / CP-LRP on every primitive (jaxprune.lrp.interpret), on models written here (other names and shapes
than jaxprune.models): conservation with zero biases and ε = 0 through LayerNorm, RMSNorm, GroupNorm, attention,
gated MLPs, depthwise convs and residuals; the rules against their matrix form written in float64 from the papers'
formulas; per-unit relevance."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import graph, lrp
from jaxprune.lrp import composites, interpret, rules


def _exact(softmax: str) -> interpret.PrimitiveComposite:
    """ε = 0 everywhere: the rules' conservation is exact."""
    return interpret.PrimitiveComposite(composites.Composite(rules.Epsilon(0.0)), softmax, 0.0)


class Mixer(nn.Module):
    """Pre-norm block: LayerNorm, two-head self-attention, residual; RMSNorm, SwiGLU, residual; token mean."""

    width: int = 10
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(use_bias=False, name="ln_a")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, use_bias=False, name="attn")(h, h)
        h = nn.RMSNorm(name="rms")(x)
        gate = nn.Dense(self.width, use_bias=False, name="gate")(h)
        up = nn.Dense(self.width, use_bias=False, name="up")(h)
        x = x + nn.Dense(x.shape[-1], use_bias=False, name="down")(nn.silu(gate) * up)
        return nn.Dense(self.classes, use_bias=False, name="head")(x.mean(axis=1))


class DepthNet(nn.Module):
    """Modern convnet: conv stem, depthwise conv, GroupNorm, GELU, pointwise conv, residual, global mean."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
        h = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="dw")(x)
        h = nn.GroupNorm(num_groups=2, use_bias=False, name="gn")(h)
        h = nn.Conv(8, (1, 1), use_bias=False, name="pw")(nn.gelu(h))
        return nn.Dense(3, use_bias=False, name="fc")((x + h).mean(axis=(1, 2)))


def _init(model, shape, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), shape)
    return model.init(jax.random.PRNGKey(seed), x), x


def _out(rel) -> np.ndarray:
    return np.asarray(jnp.take_along_axis(rel.logits, rel.target[:, None], -1)[:, 0])


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("softmax", ["cp_lrp", "attn_lrp"])
def test_conservation_modern_convnet(softmax):
    v, x = _init(DepthNet(), (3, 6, 6, 2))
    rel = lrp.relevance(DepthNet(), v, x, composite=_exact(softmax))
    np.testing.assert_allclose(np.asarray(rel.input.sum((1, 2, 3))), _out(rel), rtol=1e-4)
    assert set(rel.layers) == {"stem", "dw", "pw", "fc"}


def test_conservation_transformer_block_cp_lrp():
    """CP-LRP holds the attention weights constant: relevance is conserved through the whole block."""
    v, x = _init(Mixer(), (3, 5, 6))
    rel = lrp.relevance(Mixer(), v, x, composite=_exact("cp_lrp"))
    np.testing.assert_allclose(np.asarray(rel.input.sum((1, 2))), _out(rel), rtol=1e-4)
    assert np.abs(np.asarray(rel.input)).sum() > 0


def test_conservation_gated_mlp_and_attention_products_attn_lrp():
    """Without a softmax (linear attention: q·kᵀ and × v are products of activations) AttnLRP conserves too."""
    class LinearAttention(nn.Module):
        @nn.compact
        def __call__(self, x):
            q, k, w = (nn.Dense(4, use_bias=False, name=n)(x) for n in ("q", "k", "w"))
            a = jnp.einsum("bqd,bkd->bqk", q, k)
            x = x + nn.Dense(x.shape[-1], use_bias=False, name="o")(jnp.einsum("bqk,bkd->bqd", a, w))
            return nn.Dense(2, use_bias=False, name="cls")(nn.LayerNorm(use_bias=False)(x).sum(1))

    v, x = _init(LinearAttention(), (4, 3, 5))
    rel = lrp.relevance(LinearAttention(), v, x, composite=_exact("attn_lrp"))
    np.testing.assert_allclose(np.asarray(rel.input.sum((1, 2))), _out(rel), rtol=1e-4)


def test_attn_lrp_softmax_absorbs_its_taylor_bias():
    """AttnLRP's softmax rule is not conservative (Prop. 3.1: the bias term); CP-LRP's input relevance differs."""
    v, x = _init(Mixer(), (2, 5, 6))
    a = lrp.relevance(Mixer(), v, x, composite=_exact("attn_lrp"))
    c = lrp.relevance(Mixer(), v, x, composite=_exact("cp_lrp"))
    assert not np.allclose(np.asarray(a.input), np.asarray(c.input), atol=1e-4)
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(c.logits))


# ----------------------------------------------------------------------------------------------- matrix form
class LinNormAttn(nn.Module):
    """Bias-free linear, LayerNorm (no bias), one-head softmax attention, output projection, token mean, head."""

    d: int = 5
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.d, use_bias=False, name="lin")(x)
        g = nn.LayerNorm(use_bias=False, epsilon=1e-3, name="norm")(h)
        q, k, v = (nn.Dense(self.d, use_bias=False, name=n)(g) for n in ("wq", "wk", "wv"))
        s = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q / np.sqrt(self.d), k), axis=-1)
        y = nn.Dense(self.d, use_bias=False, name="wo")(jnp.einsum("bts,bsd->btd", s, v))
        return nn.Dense(self.classes, use_bias=False, name="cls")(y.mean(axis=1))


def _matrix_lrp(p: dict, x: np.ndarray, target: int, softmax: str) -> np.ndarray:
    """AttnLRP / CP-LRP of LinNormAttn for one sample ``x: (t, d)``, float64, ε = 0, from the papers' formulas:
    ε-rule ``R_i = Σ_j x_i w_ij / z_j R_j``; the mean over tokens ``R_t = y_t / Σ_t y_t · R``; the uniform rule
    for ``S·V`` and ``q·kᵀ`` (half of ``R_ij`` split by ``a_ik b_kj / z_ij``); softmax ``R_L = L ⊙ (R_S − S ⊙
    Σ_row R_S)`` (AttnLRP) or ``R_L = 0`` with all of ``S·V``'s relevance to ``V`` (CP-LRP); LayerNorm as the
    linear map ``h ↦ (h − mean h) · γ/σ`` with σ held constant (LXT)."""
    W0, gam, Wq, Wk, Wv, Wo, Wc = (p[k] for k in ("lin", "scale", "wq", "wk", "wv", "wo", "cls"))
    d = W0.shape[1]
    h = x @ W0
    c = h - h.mean(-1, keepdims=True)
    sig = np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-3)
    g = c / sig * gam
    q, k, v = (g @ Wq) / np.sqrt(d), g @ Wk, g @ Wv
    L = q @ k.T
    S = np.exp(L - L.max(-1, keepdims=True))
    S /= S.sum(-1, keepdims=True)
    O = S @ v
    Y = O @ Wo
    pm = Y.mean(0)
    z = pm @ Wc
    R = np.zeros_like(z)
    R[target] = z[target]
    R_p = pm * ((R / z) @ Wc.T)
    R_Y = Y / Y.sum(0) * R_p
    R_O = O * ((R_Y / Y) @ Wo.T)
    if softmax == "cp_lrp":
        R_S, R_v = np.zeros_like(S), v * (S.T @ (R_O / O))
    else:
        R_S, R_v = 0.5 * S * ((R_O / O) @ v.T), 0.5 * v * (S.T @ (R_O / O))
    R_L = L * (R_S - S * R_S.sum(-1, keepdims=True))
    R_q, R_k = 0.5 * q * ((R_L / L) @ k), 0.5 * k * ((R_L / L).T @ q)
    R_g = g * ((R_q / q) @ (Wq / np.sqrt(d)).T + (R_k / k) @ Wk.T + (R_v / v) @ Wv.T)
    w = gam / sig * R_g / g
    R_h = h * (w - w.mean(-1, keepdims=True))
    return x * ((R_h / h) @ W0.T)


@pytest.mark.parametrize("softmax", ["attn_lrp", "cp_lrp"])
def test_rules_equal_matrix_form_float64(softmax):
    with jax.enable_x64(True):
        model = LinNormAttn()
        x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 3), jnp.float64)
        v = model.init(jax.random.PRNGKey(2), x)
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v)
        scale = 0.5 + jax.random.uniform(jax.random.PRNGKey(4), (5,), jnp.float64)
        v = {"params": {**v["params"], "norm": {"scale": scale}}}
        rel = lrp.relevance(model, v, x, composite=_exact(softmax), target=1)
        p = {k: np.asarray(v["params"][k]["kernel"]) for k in ("lin", "wq", "wk", "wv", "wo", "cls")}
        p["scale"] = np.asarray(scale)
        for i in range(x.shape[0]):
            want = _matrix_lrp(p, np.asarray(x[i]), 1, softmax)
            np.testing.assert_allclose(np.asarray(rel.input[i]), want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------- units, tokens, errors
def test_unit_relevance_per_channel_and_per_head():
    """All relevance passes ``lin`` and (CP-LRP) the values ``wv``: their units' relevance sums to the output's;
    a multi-head projection's units are ``(heads, head_dim)``; the output layer's is the target logit."""
    model = LinNormAttn()
    v, x = _init(model, (3, 4, 3))
    comp = _exact("cp_lrp")
    out = _out(lrp.relevance(model, v, x, composite=comp))
    for layer in ("lin", "wv"):
        r = interpret.unit_relevance(model, v, x, layer=layer, composite=comp)
        assert r.shape == (3, 5)
        np.testing.assert_allclose(np.asarray(r.sum(1)), out, rtol=1e-4)
    r = interpret.unit_relevance(model, v, x, layer="cls", composite=comp)
    np.testing.assert_allclose(np.asarray(r.sum(1)), out, rtol=1e-5)
    assert int((np.abs(np.asarray(r)) > 0).sum()) == 3  # the target logit only
    mv, mx = _init(Mixer(), (2, 5, 6))
    r = interpret.unit_relevance(Mixer(), mv, mx, layer="attn/query", composite="attn_lrp")
    full = lrp.relevance(Mixer(), mv, mx, composite="attn_lrp").layers["attn/query"]
    assert r.shape == (2, 2, 3)
    np.testing.assert_allclose(np.asarray(r), np.asarray(full.sum(1)), rtol=1e-5, atol=1e-7)


class TokenNet(nn.Module):
    """Token ids → embedding + learned positions, one pre-norm attention block, mean, classifier."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(11, 6, name="tok")(ids) + self.param("pos", nn.initializers.normal(0.5), (ids.shape[1], 6))
        h = nn.LayerNorm(use_bias=False)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False, name="sa")(h, h)
        return nn.Dense(3, use_bias=False, name="out")(x.mean(1))


def test_token_input_relevance_per_token():
    """Integer inputs: relevance starts at the embedded vectors; per token it is their sum over the embedding
    axis. With CP-LRP and ε = 0 the learned positions take their share (a bias-like add): tokens + positions
    = output; with zero positions the tokens get it all."""
    ids = jax.random.randint(jax.random.PRNGKey(0), (3, 4), 0, 11)
    v = TokenNet().init(jax.random.PRNGKey(1), ids)
    rel = lrp.relevance(TokenNet(), v, ids, composite=_exact("cp_lrp"))
    assert rel.input.shape == (3, 4) and jnp.issubdtype(rel.input.dtype, jnp.floating)
    v0 = {"params": {**v["params"], "pos": jnp.zeros_like(v["params"]["pos"])}}
    rel0 = lrp.relevance(TokenNet(), v0, ids, composite=_exact("cp_lrp"))
    np.testing.assert_allclose(np.asarray(rel0.input.sum(1)), _out(rel0), rtol=1e-4)
    assert not np.allclose(np.asarray(rel.input.sum(1)), _out(rel), rtol=1e-3)


def test_refusals_and_bad_arguments():
    class Ratio(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Dense(3, name="a")(x) / nn.Dense(3, name="b")(x))

    x = jnp.ones((2, 4))
    v = Ratio().init(jax.random.PRNGKey(0), x)
    with pytest.raises(graph.UnsupportedError, match="division of two activations"):
        lrp.relevance(Ratio(), v, x, composite="attn_lrp")
    with pytest.raises(ValueError, match="composite='attn'"):
        interpret.relevance(Ratio(), v, x, composite="attn")
    with pytest.raises(ValueError, match="softmax='plain'"):
        interpret.PrimitiveComposite(softmax="plain")
    dv, dx = _init(DepthNet(), (1, 6, 6, 2))
    with pytest.raises(ValueError, match=r"layers: \['nope'\]"):
        interpret.relevance(DepthNet(), dv, dx, layers=("nope",))
    assert set(interpret.PRESETS) >= {"attn_lrp", "cp_lrp"}


def test_gamma_option_on_linear_layers():
    """``gamma`` puts LRP-γ on every non-output linear layer (ε on the output layer), as a Composite lookup."""
    comp = interpret.attn_lrp(gamma=0.25)
    assert comp.linear.rule_for("stem", "conv") == rules.Gamma(0.25, 1e-6)
    assert comp.linear.rule_for("fc", "dense", ("output",)) == rules.Epsilon(1e-6)
    v, x = _init(DepthNet(), (2, 6, 6, 2))
    a = lrp.relevance(DepthNet(), v, x, composite=comp)
    b = lrp.relevance(DepthNet(), v, x, composite="attn_lrp")
    assert not np.allclose(np.asarray(a.input), np.asarray(b.input), atol=1e-5)


def test_composite_names_and_zbox_checked():
    v, x = _init(DepthNet(), (1, 6, 6, 2))
    bad = interpret.PrimitiveComposite(composites.Composite.of(names={"conv9": rules.Epsilon()}))
    with pytest.raises(ValueError, match=r"composite names \['conv9'\]"):
        lrp.relevance(DepthNet(), v, x, composite=bad)
    box = interpret.PrimitiveComposite(composites.Composite.of(names={"stem": rules.ZBox((0.0,) * 3, (1.0,) * 3)}))
    with pytest.raises(ValueError, match="ZBox low=.* on layer 'stem'.* 2 per-channel"):
        lrp.relevance(DepthNet(), v, x, composite=box)


def test_under_jit_and_vmap_same_as_eager():
    v, x = _init(Mixer(), (3, 5, 6))
    want = lrp.relevance(Mixer(), v, x, composite="cp_lrp").input
    jitted = jax.jit(lambda u: lrp.relevance(Mixer(), v, u, composite="cp_lrp").input)(x)
    mapped = jax.vmap(lambda u: lrp.relevance(Mixer(), v, u[None], composite="cp_lrp").input[0])(x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_classic_refusal_points_to_the_presets_which_follow_the_gate():
    class Gate(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(6, use_bias=False, name="value")(x))
            g = nn.sigmoid(nn.Dense(6, use_bias=False, name="gate")(x))
            return nn.Dense(3, use_bias=False, name="out")(h * g)

    v, x = _init(Gate(), (4, 5))
    with pytest.raises(graph.UnsupportedError, match="mul of two activations.*'attn_lrp' and 'cp_lrp'"):
        lrp.relevance(Gate(), v, x, composite="epsilon")
    rel = lrp.relevance(Gate(), v, x, composite=_exact("attn_lrp"))
    np.testing.assert_allclose(np.asarray(rel.input.sum(1)), _out(rel), rtol=1e-4)


class HeadsBlock(nn.Module):
    """pre-LN attention (3 heads of 2) + GELU MLP, mean over tokens, 4 classes."""

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="n_a")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=6, name="mix")(y, y)
        x = x + nn.Dense(5, name="back")(nn.gelu(nn.Dense(9, name="wide")(nn.LayerNorm(name="n_b")(x))))
        return nn.Dense(4, name="readout")(x.mean(1))


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_lrp_criterion_with_attn_lrp_scores_heads_per_head_and_skips_the_output_layer():
    """criteria.lrp_scores on a transformer: a head projection's score is its heads' relevance summed over samples,
    tokens and each head's channels — shape (heads,), like the gradient criteria — never per head channel."""
    from jaxprune import criteria

    model = HeadsBlock()
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 5))
    v = model.init(jax.random.PRNGKey(4), x)
    y = jnp.array([0, 3, 1, 2])
    got = criteria.lrp_scores(model, v, x, y, composite="attn_lrp", norm=None)
    assert set(got) == {"mix/query", "mix/key", "mix/value", "mix/out", "wide", "back"}
    for k in ("mix/query", "mix/key", "mix/value"):
        per_unit = np.asarray(lrp.unit_relevance(model, v, x, layer=k, composite="attn_lrp", target=y))
        assert per_unit.shape == (4, 3, 2) and np.shape(got[k]) == (3,)
        np.testing.assert_allclose(np.asarray(got[k]), per_unit.sum(axis=(0, 2)), rtol=1e-5, atol=1e-7)
    wide = np.asarray(lrp.unit_relevance(model, v, x, layer="wide", composite="attn_lrp", target=y))
    np.testing.assert_allclose(np.asarray(got["wide"]), wide.sum(0), rtol=1e-5, atol=1e-7)
