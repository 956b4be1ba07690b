"""Attention heads, grouped-query attention and gated MLPs as prunable units (jaxprune.graph.attention), on models
written here (other names and shapes than jaxprune.models): removal == masking, closed-form FLOP and parameter
counts, criteria on heads, and LRP's refusal naming the op."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import criteria, graph
from jaxprune import structured as st


# ----------------------------------------------------------------------------------------------- models
class Tower(nn.Module):
    """Pre-LN encoder block: LN → MultiHeadDotProductAttention → residual; LN → dense → GELU → dense → residual."""

    heads: int
    head_dim: int
    width: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="norm_a")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.heads * self.head_dim,
                                                name="attn")(y, y)
        y = nn.LayerNorm(name="norm_b")(x)
        return x + nn.Dense(self.width, name="ffn_out")(nn.gelu(nn.Dense(self.hidden, name="ffn_in")(y)))


class PatchViT(nn.Module):
    """(n, 6, 6, 1) → 2×2 patches → dense (10) + class token + position embedding → two pre-LN towers with
    ``heads`` heads of ``head_dim`` → LN → class token → dense (5)."""

    heads: tuple = (3, 2)
    head_dim: int = 4
    width: int = 10
    hidden: int = 14

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // 2) * (w // 2), -1)
        x = nn.Dense(self.width, name="embed")(x)
        cls = self.param("cls_tok", nn.initializers.normal(0.1), (1, 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], axis=1)
        x = x + self.param("where", nn.initializers.normal(0.1), (x.shape[1], self.width))
        for i, hd in enumerate(self.heads):
            x = Tower(hd, self.head_dim, self.width, self.hidden, name=f"tower{i}")(x)
        return nn.Dense(5, name="logits")(nn.LayerNorm(name="norm_f")(x)[:, 0])


class EinsumAttention(nn.Module):
    """(n, tokens, 6) → raw-parameter einsum attention (``btd,dhk->bthk`` projections, ``bthk,hkd->btd`` output)
    → residual → mean over tokens → dense (3)."""

    heads: int = 3
    head_dim: int = 2
    softmax: Any = jax.nn.softmax

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        init = nn.initializers.normal(0.3)
        wq, wk, wv = (self.param(f"w_{c}", init, (d, self.heads, self.head_dim)) for c in "qkv")
        wo = self.param("w_o", init, (self.heads, self.head_dim, d))
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w) for w in (wq, wk, wv))
        att = self.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(self.head_dim))
        x = x + jnp.einsum("bthk,hkd->btd", jnp.einsum("bhts,bshk->bthk", att, v), wo)
        return nn.Dense(3, name="out_dense")(x.mean(axis=1))


class SplitHeads(nn.Module):
    """(n, tokens, 5) → dense q/k/v (heads·head_dim) reshaped to heads → attention → heads merged back by reshape
    → dense (5) → residual → mean → dense (2)."""

    heads: int = 3
    head_dim: int = 2

    def with_widths(self, widths: dict) -> "SplitHeads":
        return self.clone(heads=int(widths.get("to_q", self.heads * self.head_dim)) // self.head_dim)

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        q, k, v = (nn.Dense(self.heads * self.head_dim, name=f"to_{c}")(x).reshape(n, t, self.heads, self.head_dim)
                   for c in "qkv")
        att = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), axis=-1)
        x = x + nn.Dense(d, name="merge")(jnp.einsum("bhts,bshk->bthk", att, v).reshape(n, t, -1))
        return nn.Dense(2, name="cls")(x.mean(axis=1))


class TinyGPT(nn.Module):
    """Token ids → embedding (vocab 17, width 12) → RMSNorm → causal grouped-query attention (``kv_heads`` key/value
    heads, ``group`` query heads each, ``DenseGeneral``) → residual → RMSNorm → SwiGLU (``silu(x W_gate) ·
    (x W_up) → W_down``) → residual → RMSNorm → readout tied to the embedding."""

    kv_heads: int = 3
    group: int = 2
    head_dim: int = 4
    ffn: int = 10
    width: int = 12
    vocab: int = 17

    def with_widths(self, widths: dict) -> "TinyGPT":
        kv = widths.get("mix/k_proj", widths.get("mix/q_proj", self.kv_heads * self.group) // self.group)
        return self.clone(kv_heads=int(kv), ffn=int(widths.get("gate", widths.get("up", self.ffn))))

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(self.vocab, self.width, name="tok")
        x = emb(ids)
        n, t, _ = x.shape
        y = nn.RMSNorm(name="rms_a")(x)
        q = nn.DenseGeneral((self.kv_heads * self.group, self.head_dim), use_bias=False, name="mix/q_proj")(y)
        k = nn.DenseGeneral((self.kv_heads, self.head_dim), use_bias=False, name="mix/k_proj")(y)
        v = nn.DenseGeneral((self.kv_heads, self.head_dim), use_bias=False, name="mix/v_proj")(y)
        q = q.reshape(n, t, self.kv_heads, self.group, self.head_dim)
        s = jnp.einsum("btgrd,bsgd->bgrts", q, k) / np.sqrt(self.head_dim)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
        o = jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(s, axis=-1), v).reshape(n, t, -1, self.head_dim)
        x = x + nn.DenseGeneral(self.width, axis=(-2, -1), use_bias=False, name="mix/o_proj")(o)
        y = nn.RMSNorm(name="rms_b")(x)
        h = nn.silu(nn.Dense(self.ffn, use_bias=False, name="gate")(y)) * nn.Dense(self.ffn, use_bias=False,
                                                                                    name="up")(y)
        x = x + nn.Dense(self.width, use_bias=False, name="down")(h)
        return emb.attend(nn.RMSNorm(name="rms_f")(x))


def _vit():
    model = PatchViT()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 6, 1))
    return model, model.init(jax.random.PRNGKey(0), x), x


def _gpt():
    model = TinyGPT()
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 17)
    return model, model.init(jax.random.PRNGKey(0), ids), ids


def _qkv(block: str, kept) -> dict:
    return {f"{block}/{p}": np.asarray(kept) for p in ("query", "key", "value")}


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- heads
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_heads_of_linen_attention_are_units_coupled_across_query_key_value_and_output():
    model, v, x = _vit()
    g = graph.build(model, v, x)
    att = "tower0/attn"
    assert [g.layers[f"{att}/{p}"].kind for p in ("query", "key", "value", "out")] == ["heads"] * 3 + ["dense"]
    assert g.layers[f"{att}/query"].units == 3 and g.layers["tower1/attn/key"].units == 2
    assert g.layers[f"{att}/out"].in_axis == 0 and set(g.layers[f"{att}/out"].inputs) >= {f"{att}/query"}
    assert (f"{att}/query", f"{att}/key", f"{att}/value") in g.coupled_groups()
    assert g.why_not_prunable(f"{att}/out") is not None  # the residual stream through LayerNorm stays frozen
    assert "ffn_in" in " ".join(g.prunable())


def test_removing_heads_equals_masking_them_and_the_rebuilt_vit_has_fewer_heads():
    model, v, x = _vit()
    keep = {**_qkv("tower0/attn", [0, 2]), **_qkv("tower1/attn", [1])}
    small, sv = st.remove_many(model, v, keep, x=x)
    masked = st.mask_many(model, v, keep, x=x)
    assert small.heads == (2, 1) and sv["params"]["tower0"]["attn"]["query"]["kernel"].shape == (10, 2, 4)
    assert sv["params"]["tower0"]["attn"]["out"]["kernel"].shape == (2, 4, 10)
    assert sv["params"]["tower1"]["attn"]["value"]["bias"].shape == (1, 4)
    _close(model.apply(masked, x), small.apply(sv, x))
    assert np.abs(np.asarray(model.apply(masked, x) - model.apply(v, x))).max() > 1e-3  # the heads did matter
    a = masked["params"]["tower0"]["attn"]
    for p in ("query", "key", "value"):  # the masked head's q/k/v slices and out rows are zero, the others not
        assert not np.asarray(a[p]["kernel"][:, 1]).any() and not np.asarray(a[p]["bias"][1]).any()
        assert np.asarray(a[p]["kernel"][:, 0]).all()
    assert not np.asarray(a["out"]["kernel"][1]).any() and np.asarray(a["out"]["kernel"][0]).all()


def test_a_masked_heads_contribution_is_exactly_zero():
    model, v, x = _vit()
    masked = st.mask_many(model, v, _qkv("tower0/attn", [0, 1]), x=x)
    a = v["params"]["tower0"]["attn"]
    only_out = jax.tree_util.tree_map(lambda t: t, v)
    only_out["params"]["tower0"]["attn"]["out"]["kernel"] = a["out"]["kernel"].at[2].set(0.0)
    np.testing.assert_array_equal(model.apply(masked, x), model.apply(only_out, x))


def test_einsum_written_attention_heads_remove_equals_mask():
    model = EinsumAttention()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 6))
    v = model.init(jax.random.PRNGKey(0), x)
    g = graph.build(model, v, x)
    assert ("params/w_q", "params/w_k", "params/w_v") in g.coupled_groups()
    keep = {f"params/w_{c}": np.array([0, 2]) for c in "qkv"}
    small, sv = st.remove_many(model, v, keep, x=x)
    assert small.heads == 2 and sv["params"]["w_o"].shape == (2, 2, 6)
    _close(model.apply(st.mask_many(model, v, keep, x=x), x), small.apply(sv, x))


@jax.custom_jvp
def custom_softmax(z):
    """A softmax over the last axis behind ``jax.custom_jvp`` (as ``jax.nn.softmax`` is from jax 0.12.1 on)."""
    e = jnp.exp(z - jax.lax.stop_gradient(z.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


@custom_softmax.defjvp
def _custom_softmax_jvp(primals, tangents):
    s = custom_softmax(primals[0])
    return s, s * (tangents[0] - (s * tangents[0]).sum(-1, keepdims=True))


def test_a_softmax_behind_custom_jvp_is_read_through_for_heads_and_lrp():
    """A custom_jvp call that reduces along an axis is inlined: heads stay units (remove == mask) and AttnLRP
    conserves through it; an elementwise custom_jvp (jax.nn.relu) stays one activation."""
    from jaxprune import lrp

    model = EinsumAttention(softmax=custom_softmax)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 6))
    v = model.init(jax.random.PRNGKey(0), x)
    assert "custom_jvp_call" in str(jax.make_jaxpr(lambda a: model.apply(v, a))(x))
    g = graph.build(model, v, x)
    assert ("params/w_q", "params/w_k", "params/w_v") in g.coupled_groups()
    keep = {f"params/w_{c}": np.array([0, 2]) for c in "qkv"}
    small, sv = st.remove_many(model, v, keep, x=x)
    _close(model.apply(st.mask_many(model, v, keep, x=x), x), small.apply(sv, x))
    r = lrp.relevance(model, v, x, composite="attn_lrp")
    assert np.all(np.isfinite(np.asarray(r.input)))
    relu_net = nn.Sequential([nn.Dense(4), jax.nn.relu, nn.Dense(2)])
    xr = jnp.ones((2, 3))
    gr = graph.build(relu_net, relu_net.init(jax.random.PRNGKey(0), xr), xr)
    assert any(e.name == "custom_jvp_call" for e in gr.program.eqns)  # relu kept whole


def test_dense_then_reshape_heads_couple_each_heads_channels():
    model = SplitHeads()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 5))
    v = model.init(jax.random.PRNGKey(0), x)
    g = graph.build(model, v, x)
    assert g.coupled_groups() == (("to_q", "to_k", "to_v"),) and g.layers["merge"].inputs == ("to_q", "to_k", "to_v")
    with pytest.raises(ValueError, match="coupled"):  # half a head cannot go
        st.remove_many(model, v, {c: np.array([0, 2, 3, 4, 5]) for c in ("to_q", "to_k", "to_v")}, x=x)
    keep = st.keep_coupled(model, v, {"to_q": np.array([0, 1, 4, 5])}, x=x)  # heads 0 and 2
    assert {k: np.asarray(a).tolist() for k, a in keep.items()} == {c: [0, 1, 4, 5] for c in ("to_q", "to_k", "to_v")}
    small, sv = st.remove_many(model, v, keep, x=x)
    masked = st.mask_many(model, v, keep, x=x)
    assert small.heads == 2 and sv["params"]["merge"]["kernel"].shape == (4, 5)
    _close(model.apply(masked, x), small.apply(sv, x))
    assert np.abs(np.asarray(model.apply(masked, x) - model.apply(v, x))).max() > 1e-4


# ----------------------------------------------------------------------------------------------- GQA, SwiGLU
def test_a_kv_heads_removal_takes_its_query_group():
    model, v, ids = _gpt()
    g = graph.build(model, v, ids)
    assert g.layers["mix/q_proj"].units == 6 and g.layers["mix/k_proj"].units == 3
    assert ("mix/q_proj", "mix/k_proj", "mix/v_proj") in g.coupled_groups()
    keep = st.keep_coupled(model, v, {"mix/k_proj": np.array([0, 2])}, x=ids)
    assert {k: np.asarray(a).tolist() for k, a in keep.items()} == {
        "mix/k_proj": [0, 2], "mix/q_proj": [0, 1, 4, 5], "mix/v_proj": [0, 2]}
    with pytest.raises(ValueError, match="coupled"):  # one query head of a group alone cannot go
        st.remove_many(model, v, {**keep, "mix/q_proj": np.array([0, 4, 5])}, x=ids)
    small, sv = st.remove_many(model, v, keep, x=ids)
    assert small.kv_heads == 2 and sv["params"]["mix/o_proj"]["kernel"].shape == (4, 4, 12)
    _close(model.apply(st.mask_many(model, v, keep, x=ids), ids), small.apply(sv, ids))


class RepeatKV(nn.Module):
    """Grouped-query attention written with ``jnp.repeat`` of the key/value heads: (n, tokens, 5) → q (kv·rep heads
    of 2), k, v (kv heads) → attention → output projection → residual → mean → dense (2)."""

    kv: int = 2
    rep: int = 3

    def with_widths(self, widths: dict) -> "RepeatKV":
        return self.clone(kv=int(widths.get("kp", self.kv)))

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((self.kv * self.rep, 2), name="qp")(x)
        k, v = (jnp.repeat(nn.DenseGeneral((self.kv, 2), name=f"{c}p")(x), self.rep, axis=2) for c in "kv")
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
        o = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="op")(jnp.einsum("bhts,bshd->bthd", att, v))
        return nn.Dense(2, name="cls")((x + o).mean(axis=1))


def test_kv_heads_repeated_with_jnp_repeat_take_their_query_group():
    model = RepeatKV()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 5))
    v = model.init(jax.random.PRNGKey(0), x)
    keep = st.keep_coupled(model, v, {"kp": np.array([1])}, x=x)
    assert {k: np.asarray(a).tolist() for k, a in keep.items()} == {"kp": [1], "qp": [3, 4, 5], "vp": [1]}
    small, sv = st.remove_many(model, v, keep, x=x)
    assert small.kv == 1 and sv["params"]["op"]["kernel"].shape == (3, 2, 5)
    _close(model.apply(st.mask_many(model, v, keep, x=x), x), small.apply(sv, x))


def test_gated_mlp_units_are_coupled_across_gate_and_up_and_removable():
    model, v, ids = _gpt()
    g = graph.build(model, v, ids)
    assert ("gate", "up") in g.coupled_groups() and g.layers["down"].inputs == ("gate", "up")
    keep = st.keep_coupled(model, v, {"gate": np.array([1, 3, 4, 8])}, x=ids)
    assert np.asarray(keep["up"]).tolist() == [1, 3, 4, 8]
    both = {**keep, **st.keep_coupled(model, v, {"mix/k_proj": np.array([1])}, x=ids)}
    small, sv = st.remove_many(model, v, both, x=ids)
    assert small.ffn == 4 and sv["params"]["down"]["kernel"].shape == (4, 12)
    _close(model.apply(st.mask_many(model, v, both, x=ids), ids), small.apply(sv, ids))


# ----------------------------------------------------------------------------------------------- counts
def _vit_counts(heads, dh=4, d=10, f=14, patches=9, pc=4, classes=5):
    t = patches + 1
    macs = patches * pc * d + d * classes
    params = pc * d + d + d + t * d + 2 * d + d * classes + classes  # embed, cls, where, norm_f, logits
    for h in heads:
        macs += 3 * t * d * h * dh + t * h * dh * d + 2 * h * t * t * dh + 2 * t * d * f
        params += 3 * (d * h * dh + h * dh) + h * dh * d + d + 2 * (2 * d) + d * f + f + f * d + d
    return macs, params


def _gpt_counts(kv, ffn, r=2, dh=4, d=12, vocab=17, t=5):
    h = kv * r
    macs = t * d * h * dh + 2 * t * d * kv * dh + 2 * h * t * t * dh + t * h * dh * d + 3 * t * d * ffn
    macs += t * d * vocab
    params = vocab * d + 3 * d + d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * ffn
    return macs, params


def _n_params(v):
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(v["params"]))


def test_flops_and_parameter_counts_equal_closed_forms_with_heads_removed():
    model, v, x = _vit()
    macs, params = _vit_counts((3, 2))
    got = st.count_flops(model, v, x.shape)
    assert (got["macs"], _n_params(v), got["uncounted"]) == (macs, params, ())
    small, sv = st.remove_many(model, v, {**_qkv("tower0/attn", [2]), **_qkv("tower1/attn", [0])}, x=x)
    assert (st.count_flops(small, sv, x.shape)["macs"], _n_params(sv)) == _vit_counts((1, 1))
    gpt, gv, ids = _gpt()
    assert (st.count_flops(gpt, gv, ids)["macs"], _n_params(gv)) == _gpt_counts(3, 10)
    keep = {**st.keep_coupled(gpt, gv, {"mix/k_proj": np.array([1])}, x=ids),
            **st.keep_coupled(gpt, gv, {"up": np.arange(7)}, x=ids)}
    small, sv = st.remove_many(gpt, gv, keep, x=ids)
    assert (st.count_flops(small, sv, ids)["macs"], _n_params(sv)) == _gpt_counts(1, 7)


# ----------------------------------------------------------------------------------------------- criteria
def test_criteria_score_heads_with_the_right_shapes_and_an_exact_zero():
    model, v, x = _vit()
    y = jnp.array([0, 3, 1])
    for c in ("weight", "grad", "taylor"):
        s = criteria.scores(c, model, v, x, y)
        assert s["tower0/attn/query"].shape == (3,) and s["tower1/attn/value"].shape == (2,)
        assert s["tower0/ffn_in"].shape == (14,) and all(np.isfinite(a).all() for a in s.values())
    a = v["params"]["tower0"]["attn"]
    dead = jax.tree_util.tree_map(lambda t: t, v)
    dead["params"]["tower0"]["attn"]["out"]["kernel"] = a["out"]["kernel"].at[1].set(0.0)  # head 1 sends nothing
    dead["params"]["tower0"]["attn"]["value"]["kernel"] = a["value"]["kernel"].at[:, 1].set(0.0)
    for c in ("grad", "taylor"):
        s = criteria.scores(c, model, dead, x, y, normalized=False)
        for p in ("query", "key", "value"):
            got = np.asarray(s[f"tower0/attn/{p}"])
            assert got[1] == 0.0 and (got[[0, 2]] > 0).all(), (c, p, got)
    w = criteria.scores("weight", model, dead, x, normalized=False)["tower0/attn/value"]
    assert float(w[1]) == 0.0 and (np.asarray(w)[[0, 2]] > 0).all()
    unit = st.unit_params(graph.build(model, v, x), "tower0/attn/query")  # a head's kernel slice and bias rows
    kept = st.select_units(unit["kernel"], 2, "l2")
    q = a["query"]
    norms = [np.sqrt(np.sum(np.asarray(q["kernel"][:, j], np.float64) ** 2) + np.sum(np.asarray(q["bias"][j]) ** 2))
             for j in range(3)]
    assert np.asarray(kept).tolist() == sorted(np.argsort(norms)[1:].tolist())


def test_gpt_weight_criterion_scores_kv_and_query_heads_and_gated_units():
    model, v, ids = _gpt()
    s = criteria.scores("weight", model, v, ids)
    assert {k: a.shape for k, a in s.items()} == {"mix/q_proj": (6,), "mix/k_proj": (3,), "mix/v_proj": (3,),
                                                  "mix/o_proj": (12,), "gate": (10,), "up": (10,), "down": (12,)}


def test_lrp_refuses_attention_naming_the_op_before_any_layer_runs():
    model, v, x = _vit()  # LayerNorm is the first op LRP cannot follow here
    with pytest.raises(graph.UnsupportedError, match="reduce_sum after layer 'embed'"):
        criteria.scores("lrp", model, v, x, jnp.array([0, 3, 1]))
    model = EinsumAttention()
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 6))
    with pytest.raises(graph.UnsupportedError, match="dot_general of two activations .* after layer 'params/w_v'"):
        criteria.scores("lrp", model, model.init(jax.random.PRNGKey(0), x), x, jnp.array([0, 2]))


# ----------------------------------------------------------------------------------------------- NNX
def test_nnx_attention_heads_are_read_and_their_removal_equals_masking():
    from flax import nnx

    class NnxBlock(nnx.Module):
        def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
            self.ln = nnx.LayerNorm(d, rngs=rngs)
            self.mha = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=heads * 3, decode=False,
                                              rngs=rngs)
            self.head = nnx.Linear(d, 4, rngs=rngs)

        def __call__(self, x):
            return self.head((x + self.mha(self.ln(x))).mean(axis=1))

    x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 7))
    gd, state = nnx.split(NnxBlock(7, 4, nnx.Rngs(0)))
    g = graph.build(gd, state, x)
    assert g.coupled_groups() == (("mha/query", "mha/key", "mha/value"),) and g.layers["mha/key"].units == 4
    keep = {f"mha/{p}": np.array([1, 3]) for p in ("query", "key", "value")}
    masked = nnx.merge(gd, st.mask_many(gd, state, keep, x=x))(x)
    small_gd, small_state = nnx.split(NnxBlock(7, 2, nnx.Rngs(1)))  # the smaller model, built by hand here
    shrunk = g.net.with_leaves(graph.shrink(g, keep))
    assert jax.tree_util.tree_map(jnp.shape, shrunk) == jax.tree_util.tree_map(jnp.shape, small_state)
    _close(masked, nnx.merge(small_gd, shrunk)(x))


def test_lrp_refuses_a_head_layer_by_name_when_no_op_stops_it_first():
    class HeadBottleneck(nn.Module):  # x → (heads, head_dim) → back to 4 channels: no attention product in between
        heads: int = 3

        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.DenseGeneral((self.heads, 2), name="split")(x))
            return nn.Dense(2, name="cls")(nn.DenseGeneral(4, axis=(-2, -1), name="join")(h))

    model = HeadBottleneck()
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
    v = model.init(jax.random.PRNGKey(0), x)
    assert graph.build(model, v, x).layers["split"].kind == "heads"
    with pytest.raises(graph.UnsupportedError, match="attention projection 'split'"):
        criteria.scores("lrp", model, v, x, jnp.array([0, 1, 1]))
    small, sv = st.remove_units(model, v, "split", np.array([0, 2]), x=x)
    _close(model.apply(st.mask_units(model, v, "split", np.array([0, 2]), x=x), x), small.apply(sv, x))


def test_nnx_attention_shrunk_by_heads_has_consistent_attributes():
    """``nnx.MultiHeadAttention`` with ``qkv_features == in_features`` (6) and no biases: after removing one of
    three heads, its ``num_heads``/``qkv_features`` and its ``LinearGeneral`` tuples are the new shapes' (while
    ``in_features`` stays 6), and the merged module runs on a new batch like the masked one."""
    from flax import nnx

    class Mixer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.lift = nnx.Linear(4, 6, rngs=rngs)
            self.mix = nnx.MultiHeadAttention(num_heads=3, in_features=6, out_features=5, use_bias=False,
                                              decode=False, rngs=rngs)
            self.cls = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.cls(self.mix(jnp.tanh(self.lift(x))).max(axis=1))

    x = jax.random.normal(jax.random.PRNGKey(7), (3, 5, 4))
    gd, state = nnx.split(Mixer(nnx.Rngs(3)))
    keep = st.keep_coupled(gd, state, {"mix/value": np.array([0, 2])}, x=x)
    small_gd, small_state = st.remove_many(gd, state, keep, x=x)
    mix = nnx.merge(small_gd, small_state).mix
    assert (mix.num_heads, mix.qkv_features, mix.head_dim, mix.in_features, mix.out_features) == (2, 4, 2, 6, 5)
    for proj in (mix.query, mix.key, mix.value):
        assert (proj.in_features, proj.out_features) == ((6,), (2, 2))
    assert (mix.out.in_features, mix.out.out_features) == ((2, 2), (5,))
    fresh = nnx.eval_shape(lambda: nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=4, out_features=5,
                                                          use_bias=False, decode=False, rngs=nnx.Rngs(0)))
    shapes = lambda m: jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(nnx.state(m)))
    assert shapes(mix) == shapes(fresh)
    masked = nnx.merge(gd, st.mask_many(gd, state, keep, x=x))
    _close(masked(x), nnx.merge(small_gd, small_state)(x))
    again_gd, again_state = nnx.split(nnx.merge(small_gd, small_state))  # split/merge round trip, a new batch
    x2 = jax.random.normal(jax.random.PRNGKey(8), (4, 2, 4))
    _close(masked(x2), nnx.merge(again_gd, again_state)(x2))
