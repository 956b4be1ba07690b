"""Heads and units of a decoder language model (token ids -> per-position logits): removal through the graph equals
masking those heads' q/k/v/out channels (a model written here and :class:`jaxprune.models.GPT`), and the LM scores
of :mod:`jaxprune.lm_criteria`: LRP conservation (CP-LRP, zero biases, ε = 0), LRP as the sum of per-position
explanations, grad/taylor against a hand-written forward with probes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import lm_criteria, models, structured
from jaxprune.lrp import composites, interpret, rules

VOCAB, T, D, H, HW, HID = 7, 5, 12, 3, 4, 10  # vocabulary, positions, width, heads, head width, MLP units


class Mixer(nn.Module):
    """Causal self-attention of ``heads`` heads of ``head_width`` channels (their number read from the width)."""

    heads: int = H
    head_width: int = HW

    @nn.compact
    def __call__(self, h):
        b, t, _ = h.shape
        q, k, v = (nn.Dense(self.heads * self.head_width, name=n)(h).reshape(b, t, -1, self.head_width)
                   for n in ("wq", "wk", "wv"))
        s = jnp.einsum("bihc,bjhc->bhij", q, k) / np.sqrt(self.head_width)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
        o = jnp.einsum("bhij,bjhc->bihc", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
        return nn.Dense(h.shape[-1], name="wo")(o)


class TinyDecoder(nn.Module):
    """``ids (b, t) -> logits (b, t, VOCAB)``: embedding + positions, one pre-norm block, readout ``unembed``."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="tok")(ids) + self.param("where", nn.initializers.normal(0.5), (T, D))[:ids.shape[1]]
        x = x + Mixer(name="mix")(nn.LayerNorm(name="norm_a")(x))
        u = nn.Dense(HID, name="up")(nn.LayerNorm(name="norm_b")(x))
        x = x + nn.Dense(D, name="down")(nn.gelu(u))
        return nn.Dense(VOCAB, name="unembed")(x)


def _setup(model=None, seed=0):
    model = model or TinyDecoder()
    ids = jax.random.randint(jax.random.PRNGKey(seed + 1), (3, T), 0, VOCAB)
    nxt = jax.random.randint(jax.random.PRNGKey(seed + 2), (3, T), 0, VOCAB)
    variables = model.init(jax.random.PRNGKey(seed), ids)
    # non-zero biases, so a kept head's bias and a removed one's both matter
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), a.shape)
        if "bias" in str(p) else a, variables)
    return model, variables, ids, nxt


def _hand_masked(variables, attn: str, heads_off, hw: int, mlp: tuple):
    """The q/k/v output channels and the out input rows of heads ``heads_off`` zeroed by hand, and the MLP units
    ``mlp[2]`` of ``mlp = (in layer, out layer, units)`` (their column, bias, and row of the out layer)."""
    p = jax.tree_util.tree_map(np.array, variables["params"])
    a = p[attn]
    out = "wo" if "wo" in a else "out"
    qkv = [n for n in a if n != out]
    for h in heads_off:
        cols = slice(h * hw, (h + 1) * hw)
        for n in qkv:
            a[n]["kernel"][:, cols] = 0
            a[n]["bias"][cols] = 0
        a[out]["kernel"][cols, :] = 0
    up, down, units = mlp
    p[up]["kernel"][:, units] = 0
    p[up]["bias"][units] = 0
    p[down]["kernel"][units, :] = 0
    return {"params": p}


def _remove_and_compare(model, variables, ids, qkv, mlp, shape, keep_heads):
    """Heads ``qkv`` and MLP layers ``mlp = (in, out)`` found; heads outside ``keep_heads`` and the first 2 MLP
    units removed equal to them masked by hand; ``shape``: (heads, head width, MLP units)."""
    heads, hw, hidden = shape
    assert structured.unit_groups(model, variables, x=ids) == (qkv, mlp[:1])
    by_head = jnp.asarray([float(h in keep_heads) for h in range(heads) for _ in range(hw)])
    keep = structured.select_groups(model, variables, {qkv[0]: len(keep_heads), mlp[0]: hidden - 2},
                                    {n: by_head for n in qkv} | {mlp[0]: jnp.arange(hidden, dtype=float)}, x=ids)
    np.testing.assert_array_equal(keep[qkv[1]], np.flatnonzero(by_head))
    small, small_vars = structured.remove_many(model, variables, keep, x=ids)
    got = small.apply(small_vars, ids)
    off = [h for h in range(heads) if h not in keep_heads]
    by_hand = _hand_masked(variables, qkv[0].split("/")[0], off, hw, (*mlp, [0, 1]))
    np.testing.assert_allclose(got, model.apply(by_hand, ids), atol=1e-5)
    assert not np.allclose(got, model.apply(variables, ids), atol=1e-3)  # the removal changed something
    return small, small_vars


def test_decoder_heads_found_removed_equal_masking():
    model, variables, ids, _ = _setup()
    _remove_and_compare(model, variables, ids, ("mix/wq", "mix/wk", "mix/wv"), ("up", "down"), (H, HW, HID), keep_heads=(0, 2))


def test_gpt_heads_removed_equal_masking_and_default_tree_unchanged():
    model = models.GPT(vocab_size=VOCAB, context=T, width=8, depth=1, heads=4, mlp_ratio=2)
    model, variables, ids, _ = _setup(model)
    shapes = jax.tree_util.tree_map(np.shape, variables["params"]["block_0_attn"])
    assert shapes == {n: {"kernel": (8, 8), "bias": (8,)} for n in ("q", "k", "v", "out")}
    qkv = ("block_0_attn/q", "block_0_attn/k", "block_0_attn/v")
    small, small_vars = _remove_and_compare(model, variables, ids, qkv, ("block_0_fc", "block_0_proj"), (4, 2, 16), keep_heads=(1, 3))
    assert small.apply(small_vars, ids[:, :3]).shape == (3, 3, VOCAB)  # fewer positions run too


def _exact(softmax: str) -> interpret.PrimitiveComposite:
    return interpret.PrimitiveComposite(composites.Composite(rules.Epsilon(0.0)), softmax, 0.0)


def test_lm_lrp_conserves_with_zero_biases_cp_lrp():
    model, variables, ids, nxt = _setup()
    zero = jax.tree_util.tree_map_with_path(lambda p, a: a * 0 if "bias" in str(p) or "where" in str(p) else a,
                                            variables)
    g, x, y = lm_criteria.check_batch(model, zero, ids, nxt)
    rel = interpret.graph_relevance(g, _exact("cp_lrp"), x, lambda: y)
    started = jnp.take_along_axis(rel.logits, y[..., None], -1).sum()
    assert abs(float(started)) > 1e-3
    np.testing.assert_allclose(float(rel.input.sum()), float(started), rtol=1e-4)
    # every layer between the embedding and the readout carries it all too (the MLP branch plus the residual do
    # not: the relevance a unit's output receives is a share of the whole)
    s = lm_criteria.lrp_scores(model, zero, ids, nxt, composite=_exact("cp_lrp"), norm="none")
    assert set(s) == {"mix/wq", "mix/wk", "mix/wv", "mix/wo", "up", "down"}
    assert s["up"].shape == (HID,) and s["mix/wq"].shape == (H * HW,)


class AtPosition(nn.Module):
    """The decoder's logits at one position ``(b, VOCAB)``: a classifier for :func:`interpret.relevance`."""

    i: int

    @nn.compact
    def __call__(self, ids):
        return TinyDecoder(name="lm")(ids)[:, self.i]


@pytest.mark.parametrize("softmax", ["attn_lrp", "cp_lrp"])
def test_lm_lrp_is_the_sum_of_per_position_explanations(softmax):
    model, variables, ids, nxt = _setup()
    ids, nxt = ids[:, :2], nxt[:, :2]  # two positions: one compile per position
    comp = interpret.PrimitiveComposite(composites.Composite(rules.Epsilon(1e-6)), softmax)
    got = lm_criteria.lrp_scores(model, variables, ids, nxt, composite=comp, norm="none")
    want = {k: 0.0 for k in got}
    for i in range(ids.shape[1]):
        rel = interpret.relevance(AtPosition(i), {"params": {"lm": variables["params"]}}, ids, composite=comp,
                                  target=nxt[:, i])
        for k in got:
            want[k] = want[k] + rel.layers[f"lm/{k}"].sum(axis=(0, 1))
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6 * float(jnp.abs(want[k]).max()))


def _hand_logits(p, ids, probes, zs=None):
    """TinyDecoder written out in jnp, with ``probes[layer]`` added to each layer's output (its pre-activation
    ``z``, stored in ``zs``)."""
    def dense(name, x, params):
        z = x @ params[name]["kernel"] + params[name]["bias"] + probes.get(name, 0.0)
        if zs is not None:
            zs[name] = z
        return z

    def ln(name, x):
        m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-6) * p[name]["scale"] + p[name]["bias"]

    b, t = ids.shape
    x = p["tok"]["embedding"][ids] + p["where"]
    h = ln("norm_a", x)
    q, k, v = (dense(n, h, p["mix"]).reshape(b, t, H, HW) for n in ("wq", "wk", "wv"))
    s = jnp.einsum("bihc,bjhc->bhij", q, k) / np.sqrt(HW)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    x = x + dense("wo", jnp.einsum("bhij,bjhc->bihc", jax.nn.softmax(s, -1), v).reshape(b, t, -1), p["mix"])
    u = dense("up", ln("norm_b", x), p)
    x = x + dense("down", jax.nn.gelu(u), p)
    return dense("unembed", x, p)


def test_lm_grad_taylor_equal_hand_computation():
    model, variables, ids, nxt = _setup()
    p = variables["params"]
    zs = {}
    np.testing.assert_allclose(_hand_logits(p, ids, {}, zs), model.apply(variables, ids), atol=1e-5)
    layers = {"wq": "mix/wq", "wk": "mix/wk", "wv": "mix/wv", "wo": "mix/wo", "up": "up", "down": "down"}
    zero = {n: jnp.zeros_like(zs[n]) for n in layers}
    # L: the next-token cross-entropy summed over examples and positions
    grads = jax.grad(lambda pr: optax.softmax_cross_entropy_with_integer_labels(
        _hand_logits(p, ids, pr), nxt).sum())(zero)
    got_g = lm_criteria.grad(model, variables, ids, nxt, norm="none")
    got_t = lm_criteria.taylor(model, variables, ids, nxt, norm="none")
    assert set(got_g) == set(got_t) == set(layers.values())
    for n, layer in layers.items():
        g = np.asarray(grads[n]).reshape(-1, zs[n].shape[-1])
        z = np.asarray(zs[n]).reshape(g.shape)
        np.testing.assert_allclose(got_g[layer], np.abs(g.mean(0)), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got_t[layer], np.abs((z * g).mean(0)), rtol=1e-4, atol=1e-7)
    normed = lm_criteria.scores("taylor", model, variables, ids, nxt)
    np.testing.assert_allclose(normed["up"], got_t["up"] / np.linalg.norm(got_t["up"]), rtol=1e-5)


def test_lm_scores_refuse_bad_input():
    model, variables, ids, nxt = _setup()
    with pytest.raises(ValueError, match="^x: expected integer token ids"):
        lm_criteria.grad(model, variables, ids.astype(jnp.float32), nxt)
    with pytest.raises(ValueError, match=r"^y: expected int next tokens of shape \(3, 5\)"):
        lm_criteria.taylor(model, variables, ids, nxt[:, 0])
    with pytest.raises(ValueError, match=r"^y: next tokens must lie in \[0, 7\)"):
        lm_criteria.lrp_scores(model, variables, ids, nxt + VOCAB)
    with pytest.raises(ValueError, match=r"^x: integer token ids must lie in \[0, 7\)"):
        lm_criteria.grad(model, variables, ids + VOCAB, nxt)
    with pytest.raises(ValueError, match=r"^model: expected a language model returning logits \(n, t, vocab\)"):
        lm_criteria.grad(AtPosition(0), {"params": {"lm": variables["params"]}}, ids, nxt)
    with pytest.raises(ValueError, match="^criterion='kmeans'"):
        lm_criteria.scores("kmeans", model, variables, ids, nxt)
