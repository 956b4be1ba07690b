"""LRP relevance for 1000 MNIST test images: one batched jitted call vs a per-sample loop (same jitted function,
batch of one) vs ``jax.vmap`` over samples, on LeNet5 and the 784-1000-1000-500-200-10 MLP (random weights).

    python -m benchmarks.lrp [--data_dir=../shared/data] [--n=1000] [--repeats=3]

Prints a table; compile time is measured separately (first call) and excluded from the steady-state numbers.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from jaxprune import data, lrp, models


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, model, composite, x: jax.Array, repeats: int) -> list[dict]:
    v = models.init(model, jax.random.PRNGKey(0), x.shape)
    n = x.shape[0]
    batched = lambda: lrp.relevance(model, v, x, composite=composite).input  # noqa: E731
    one = lambda i: lrp.relevance(model, v, x[i:i + 1], composite=composite).input  # noqa: E731
    vm = jax.jit(jax.vmap(lambda xi: lrp.relevance(model, v, xi[None], composite=composite).input[0]))
    gxi = jax.jit(lambda xx: xx * jax.grad(lambda u: jnp.sum(jnp.max(model.apply(v, u), -1)))(xx))
    rows = []
    methods = (("batched + jit", batched), ("per-sample loop (jit, batch 1)", lambda: [one(i) for i in range(n)]),
               ("vmap over samples (jit)", lambda: vm(x)), ("gradient x input (plain jax.grad)", lambda: gxi(x)))
    for label, fn in methods:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        best = _time(fn, repeats)
        rows.append({"model": name, "method": label, "first_call_s": first, "steady_s": best, "per_s": n / best})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default=os.environ.get("JAXPRUNE_DATA_DIR", "../shared/data"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    te = data.load("mnist", "test", args.data_dir)
    x = jnp.asarray(te.images[: args.n])
    rows = bench("LeNet5 (ε dense + z⁺ conv)", models.LeNet5(10), "epsilon_plus", x, args.repeats)
    rows += bench("MLP 784-1000-1000-500-200-10 (ε)", models.MLP((1000, 1000, 500, 200, 10)), "epsilon", x,
                  args.repeats)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {args.n} MNIST test images, best of {args.repeats}")
    print("| model | method | first call (s) | steady (s) | images/s | speed-up vs loop |")
    print("|---|---|---:|---:|---:|---:|")
    loop = {r["model"]: r["steady_s"] for r in rows if r["method"].startswith("per-sample")}
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['first_call_s']:.2f} | {r['steady_s']:.3f} | {r['per_s']:.0f} | "
              f"{loop[r['model']] / r['steady_s']:.1f}x |")


if __name__ == "__main__":
    main()
