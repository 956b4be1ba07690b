"""AttnLRP relevance for 1000 inputs on CPU: ``jaxprune.lrp`` (preset ``attn_lrp``, one batched jitted call) vs LXT
(``lxt.explicit``, PyTorch, one batched backward) on the same one-block transformer (weights copied from Flax).

    python -m benchmarks.lrp_lxt [--n=1000] [--tokens=16] [--width=32] [--repeats=3] [--epsilon=E]

``--epsilon``: one stabiliser for every rule on both sides (default: each library's own defaults).

Needs ``torch`` and ``lxt`` (not dependencies of jaxprune). Prints the steady-state time of each (best of
``repeats``; jaxprune's compile time separately) and the largest difference of their input relevance.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import lrp
from jaxprune.lrp import composites, interpret, rules


class Block(nn.Module):
    """LayerNorm, one-head softmax attention, residual, LayerNorm, GELU MLP, residual, token mean, classifier."""

    width: int = 32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="n1")(x)
        q, k, v = (nn.Dense(self.width, name=n)(h) for n in "qkv")
        a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q / np.sqrt(self.width), k), -1)
        x = x + nn.Dense(self.width, name="o")(jnp.einsum("bts,bsd->btd", a, v))
        h = nn.gelu(nn.Dense(2 * self.width, name="fc1")(nn.LayerNorm(name="n2")(x)), approximate=False)
        x = x + nn.Dense(self.width, name="fc2")(h)
        return nn.Dense(10, name="head")(x.mean(1))


def _lxt(variables, width: int, eps: float | None):
    """LXT's explicit rules on the same forward; returns ``f(x) -> input relevance`` for the predicted class."""
    import torch
    from lxt.explicit import functional as lf
    from lxt.explicit import rules as lr

    p = {m: {n: torch.tensor(np.asarray(a)) for n, a in d.items()} for m, d in variables["params"].items()}
    for d in p.values():
        if "kernel" in d:
            d["weight"] = d.pop("kernel").T.contiguous()
    p["q"] = {n: a / np.sqrt(width) for n, a in p["q"].items()}
    e = {} if eps is None else {"epsilon": eps}
    lin = lambda m, a: lf.linear_epsilon(a, p[m]["weight"], p[m]["bias"], **e)  # noqa: E731
    norm = lambda m, a: lf.layer_norm_grad_fn.apply(a, p[m]["scale"], p[m]["bias"], 1e-6, *e.values())  # noqa

    def run(x):
        xt = torch.tensor(x, requires_grad=True)
        h = norm("n1", xt)
        q, k, v = lin("q", h), lin("k", h), lin("v", h)
        a = lf.matmul(lf.softmax(lf.matmul(q, k.transpose(-1, -2), **e), -1), v, **e)
        x2 = lf.add2(xt, lin("o", a), **e)
        h = lr.identity(torch.nn.functional.gelu, lin("fc1", norm("n2", x2)))
        logits = lin("head", lf.mean(lf.add2(x2, lin("fc2", h), **e), 1, False, **e))
        out = torch.zeros_like(logits)
        idx = torch.arange(len(x))
        t = logits.argmax(-1)
        out[idx, t] = logits[idx, t].detach()
        logits.backward(out)
        return xt.grad.numpy()
    return run


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=None)
    a = ap.parse_args()
    comp = "attn_lrp" if a.epsilon is None else interpret.PrimitiveComposite(
        composites.Composite(rules.Epsilon(a.epsilon)), "attn_lrp", a.epsilon)
    x = jax.random.normal(jax.random.PRNGKey(0), (a.n, a.tokens, a.width))
    model = Block(a.width)
    v = model.init(jax.random.PRNGKey(1), x[:1])
    v = jax.tree_util.tree_map(lambda w: w.astype(x.dtype), v)  # float64 throughout with JAX_ENABLE_X64=1
    ours = lambda: jax.block_until_ready(lrp.relevance(model, v, x, composite=comp).input)  # noqa: E731
    t0 = time.perf_counter()
    r = np.asarray(ours())
    first = time.perf_counter() - t0
    lxt = _lxt(v, a.width, a.epsilon)
    want = lxt(np.asarray(x))
    t_ours, t_lxt = _best(ours, a.repeats), _best(lambda: lxt(np.asarray(x)), a.repeats)
    print(f"| method | {a.n} inputs ({a.tokens} tokens x {a.width}), CPU, s |\n|---|---|")
    print(f"| jaxprune attn_lrp (batched, jit; first call {first:.2f} s) | {t_ours:.3f} |")
    print(f"| LXT explicit (torch, batched) | {t_lxt:.3f} |")
    print(f"speed-up {t_lxt / t_ours:.2f}x; max |ours - LXT| / max |LXT| = "
          f"{np.abs(r - want).max() / np.abs(want).max():.2e}")


if __name__ == "__main__":
    main()
