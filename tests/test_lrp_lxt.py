"""jaxprune.lrp.interpret against LXT (the AttnLRP authors' PyTorch package, ``lxt.explicit``): the same small
transformer (weights copied from Flax to PyTorch here) gives the same input relevance for the AttnLRP and CP-LRP
presets with one stabiliser ε = 1e-9 on both sides (at their default ε the two differ by ~1.5e-4 of the largest
relevance: LXT adds +ε to a denominator, jaxprune ε·sign(z), and LXT's defaults differ per rule). ``torch`` and
``lxt`` are test-only dependencies; the test skips when they are missing."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import lrp
from jaxprune.lrp import interpret

torch = pytest.importorskip("torch", reason="torch is not installed (test-only dependency of the LXT comparison)")
lf = pytest.importorskip("lxt.explicit.functional", reason="lxt is not installed (test-only dependency)")
lr = pytest.importorskip("lxt.explicit.rules", reason="lxt is not installed (test-only dependency)")

D, HIDDEN, CLASSES = 6, 8, 3
EPS = 1e-9


class Tiny(nn.Module):
    """Pre-LN block with biases: LayerNorm, one-head softmax attention, residual; LayerNorm, SwiGLU, residual;
    token mean; classifier."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(D, name=n)(h) for n in ("q", "k", "v"))
        s = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q / np.sqrt(D), k), axis=-1)
        x = x + nn.Dense(D, name="o")(jnp.einsum("bts,bsd->btd", s, v))
        h = nn.LayerNorm(name="ln2")(x)
        m = nn.silu(nn.Dense(HIDDEN, name="gate")(h)) * nn.Dense(HIDDEN, name="up")(h)
        x = x + nn.Dense(D, name="down")(m)
        return nn.Dense(CLASSES, name="cls")(x.mean(axis=1))


def _torch_params(v) -> dict:
    """Flax kernels ``(in, out)`` → torch weights ``(out, in)``; the query scaled by 1/√d (as the Flax forward)."""
    p = {k: {n: torch.tensor(np.asarray(a, np.float64)) for n, a in d.items()} for k, d in v["params"].items()}
    for k in p:
        if "kernel" in p[k]:
            p[k]["weight"] = p[k].pop("kernel").T.contiguous()
    p["q"] = {n: a / np.sqrt(D) for n, a in p["q"].items()}
    return p


def _lxt_relevance(p: dict, x: np.ndarray, target: np.ndarray, softmax: str) -> np.ndarray:
    """The same forward written with LXT's explicit rules (relevance carried as the gradient)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    lin = lambda name, a: lf.linear_epsilon(a, p[name]["weight"], p[name]["bias"], epsilon=EPS)
    norm = lambda name, a: lf.layer_norm_grad_fn.apply(a, p[name]["scale"], p[name]["bias"], 1e-6, EPS)
    h = norm("ln1", xt)
    q, k, v = lin("q", h), lin("k", h), lin("v", h)
    s = lf.softmax(lf.matmul(q, k.transpose(-1, -2), epsilon=EPS), -1)
    if softmax == "cp_lrp":
        sc = s.detach()
        a = lr.epsilon_lrp(lambda u: torch.matmul(sc, u), EPS, v)
    else:
        a = lf.matmul(s, v, epsilon=EPS)
    x2 = lf.add2(xt, lin("o", a), epsilon=EPS)
    h = norm("ln2", x2)
    m = lf.mul2(lr.identity(torch.nn.functional.silu, lin("gate", h)), lin("up", h))
    x3 = lf.add2(x2, lin("down", m), epsilon=EPS)
    logits = lin("cls", lf.mean(x3, 1, False, epsilon=EPS))
    out = torch.zeros_like(logits)
    idx = torch.arange(len(target))
    out[idx, target] = logits[idx, target].detach()
    logits.backward(out.detach())
    return xt.grad.numpy()


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("softmax", ["attn_lrp", "cp_lrp"])
def test_same_input_relevance_as_lxt(softmax):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(5), (4, 5, D), jnp.float64)
        v = Tiny().init(jax.random.PRNGKey(6), x)
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v)
        # non-trivial norm scales and biases (the initialiser gives ones and zeros)
        leaves, tree = jax.tree_util.tree_flatten(v)
        keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
        leaves = [a + 0.1 * jax.random.normal(kk, a.shape, a.dtype) for a, kk in zip(leaves, keys)]
        v = jax.tree_util.tree_unflatten(tree, leaves)
        rel = lrp.relevance(Tiny(), v, x, composite=interpret.PRESETS[softmax](epsilon=EPS))
        want = _lxt_relevance(_torch_params(v), np.asarray(x), np.asarray(rel.target), softmax)
    got = np.asarray(rel.input)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9 * np.abs(want).max())
