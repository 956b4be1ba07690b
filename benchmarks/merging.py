"""Merge time for VGG-16 (BatchNorm) to the paper's pruned cfg, random weights: ``python -m benchmarks.merging``.

Rows: the whole network (13 conv + BN layers decomposed, folded into the next layer and physically removed) with
jaxprune.merging, cold (first call, including XLA compilation) and warm (median of ``--repeats``), for merge and
prune and both BN scales; and, side by side, the decomposition alone written as per-unit Python loops over the
candidates (Algorithm 3 literally, numpy float64), the way the authors' code computes it.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxprune import merging, models, structured

PAPER_CFG = [32, 64, "M", 128, 128, "M", 256, 256, 256, "M", 256, 256, 256, "M", 256, 256, 256]


def _random_vgg16(seed: int):
    model = models.build("vgg16", 10)
    variables = jax.jit(lambda k: models.init(model, k, (1, 32, 32, 3)))(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map(lambda a: np.asarray(a), variables["batch_stats"])
    params = jax.tree_util.tree_map(lambda a: np.asarray(a), variables["params"])
    for name in stats:  # trained-looking BN statistics and affine parameters instead of the 0/1 initial values
        n = stats[name]["mean"].shape[0]
        stats[name] = {"mean": rng.normal(size=n).astype(np.float32),
                       "var": rng.uniform(0.1, 2.0, n).astype(np.float32)}
        params[name] = {"scale": rng.uniform(0.2, 1.5, n).astype(np.float32),
                        "bias": rng.normal(scale=0.3, size=n).astype(np.float32)}
    return model, {"params": params, "batch_stats": stats}


def _timed(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree_util.tree_leaves(fn()))
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.tree_util.tree_leaves(fn()))
        warm.append(time.perf_counter() - t0)
    return cold, float(np.median(warm))


def _loop_decomposition(kernel, keep, gamma, beta, mean, var, lam=0.85, eps=1e-5):
    """Algorithm 3 as per-unit, per-candidate Python loops (exact BN scale), float64."""
    v = np.asarray(structured.unit_vectors(kernel), np.float64)
    sd = np.sqrt(var + eps)
    n = v.shape[0]
    target, scale = np.zeros(n, int), np.zeros(n)
    kept = set(keep.tolist())
    for j in range(n):
        if j in kept:
            continue
        cos, sc, dist = [], [], []
        for k in keep:
            nj, nk = np.linalg.norm(v[j]), np.linalg.norm(v[k])
            s = nj / nk
            S = s * gamma[j] / gamma[k] * sd[k] / sd[j]
            off = abs(beta[j] - S * beta[k] + gamma[j] * (s * mean[k] - mean[j]) / sd[j])
            cos.append(v[j] @ v[k] / (nj * nk)), sc.append(S), dist.append(off / S)
        d = np.array(dist)
        span = d.max() - d.min()
        nd = (d - d.min()) / span if span > 0 else np.zeros_like(d)
        b = int(np.argmin(lam * (1 - np.array(cos)) + (1 - lam) * nd))
        target[j], scale[j] = b, sc[b]
    return target, scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--skip_loop", action="store_true", help="leave out the (slow) literal loop row")
    args = ap.parse_args()

    model, variables = _random_vgg16(0)
    widths = merging.widths_from_cfg(model, PAPER_CFG)
    print(f"VGG-16 + BN, random weights, {sum(1 for _ in widths)} conv layers → paper cfg; "
          f"criterion {args.criterion}; {jax.default_backend()} ({jax.device_count()} device)")
    rows = []
    for mode, bn_scale in (("merge", "exact"), ("merge", "paper"), ("prune", "exact")):
        fn = lambda: merging.merge(model, variables, widths, mode=mode, criterion=args.criterion,  # noqa: E731
                                   bn_scale=bn_scale).variables
        cold, warm = _timed(fn, args.repeats)
        rows.append((f"jaxprune {mode} (bn_scale={bn_scale}), whole network", cold, warm))
    decomp = lambda: [merging.decompose_layer(model, variables, layer, n, criterion=args.criterion)  # noqa: E731
                      for layer, n in widths.items()]
    cold, warm = _timed(decomp, args.repeats)
    rows.append(("jaxprune decompositions only (13 layers, on the unshrunk net)", cold, warm))
    if not args.skip_loop:
        t0 = time.perf_counter()
        for i, (layer, n) in enumerate(widths.items()):
            kernel = np.asarray(variables["params"][layer]["kernel"])
            keep = np.asarray(structured.select_units(kernel, n, args.criterion))
            bn, st = variables["params"][f"bn_{i}"], variables["batch_stats"][f"bn_{i}"]
            _loop_decomposition(kernel, keep, *(np.float64(a) for a in (bn["scale"], bn["bias"], st["mean"],
                                                                        st["var"])))
        rows.append(("Python loops (Algorithm 3 literally), decompositions only", time.perf_counter() - t0,
                     float("nan")))
    print(f"{'what':66s} {'cold s':>9s} {'warm s':>9s}")
    for name, cold, warm in rows:
        print(f"{name:66s} {cold:9.3f} {warm:9.3f}")


if __name__ == "__main__":
    main()
