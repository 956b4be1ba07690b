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
