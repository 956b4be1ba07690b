"""All layer pairs of two 7-layer networks: ``similarity.pairwise`` (one jitted call) against per-pair loops.

    python -m benchmarks.similarity                 # n = 5000, widths 1000 … 50 (the issue's setting)
    python -m benchmarks.similarity --n=1000 --widths=200,150,100,80,50,20,10   # quick

Reference (numpy float64, per pair, as google/svcca computes one pair): covariance of the stacked activations,
pseudo-inverses, inverse square roots by ``eigh``, SVD of the whitened cross-covariance → canonical correlations.
"SVCCA" rows reduce each layer once by SVD to 99 % variance (as the pruned-layer-similarity study's code does) and
then run the same per-pair CCA. Linear CKA reference: the feature-space formula per pair (numpy float64), and a
Python loop over pairs of our jitted ``linear_cka``. Ours is timed in float32 (the default) and float64 (x64);
accuracy is the largest |ours - reference| over the 49 pairs (float64 against float64 is like with like).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import similarity as S


def synthetic(n: int, widths, seed: int) -> list[np.ndarray]:
    """ReLU layers driven by a shared 32-d latent (decaying spectra, as trained nets), plus independent noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 32)) * 0.85 ** np.arange(32)
    out = []
    for w in widths:
        h = z @ rng.normal(size=(32, w)) + 0.3 * rng.normal(size=(n, w))
        out.append(np.maximum(h, 0.0))
    return out


# ------------------------------------------------------------------------------------ numpy float64 references
def _msqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def ref_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    p1 = x.shape[1]
    c = np.cov(x.T, y.T)
    sxx, sxy, syy = c[:p1, :p1], c[:p1, p1:], c[p1:, p1:]
    ixx, iyy = _msqrt(np.linalg.pinv(sxx)), _msqrt(np.linalg.pinv(syy))
    return np.linalg.svd(ixx @ sxy @ iyy, compute_uv=False)


def ref_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(frac >= keep)) + 1
    return u[:, :k] * s[:k]


def ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.sum((x.T @ y) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def timed(fn, repeats: int = 1):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--widths", default="1000,800,500,300,200,100,50")
    ap.add_argument("--keep_variance", type=float, default=0.99)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    xs, ys = synthetic(args.n, widths, 0), synthetic(args.n, widths, 1)
    L = len(widths)
    print(f"n={args.n} widths={widths} ({L}x{L} pairs), jax {jax.__version__} on {jax.devices()[0].platform}")
    rows = []

    def ours(metric: str, x64: bool, **kw):
        with jax.enable_x64(x64):
            t0 = time.perf_counter()
            jax.block_until_ready(S.pairwise(metric, xs, ys, **kw))  # compile + first run
            first = time.perf_counter() - t0
            t, v = timed(lambda: S.pairwise(metric, xs, ys, **kw), args.repeats)
        return t, first, np.asarray(v)

    # ---- mean CCA on the raw layers
    t_ref, ref = timed(lambda: np.array([[ref_cca(x, y).mean() for y in ys] for x in xs]))
    rows.append(("mean CCA", "svcca algorithm, numpy f64, per pair", t_ref, None, 0.0))
    for x64 in (False, True):
        t, first, v = ours("mean_cca", x64)
        rows.append(("mean CCA", f"pairwise {'f64' if x64 else 'f32'} (first call {first:.1f}s)", t, t_ref / t,
                     float(np.max(np.abs(v - ref)))))

    # ---- SVCCA: SVD reduction once per layer (not timed in the per-pair part), then per-pair CCA
    t_red, red = timed(lambda: ([ref_reduce(x, args.keep_variance) for x in xs],
                                [ref_reduce(y, args.keep_variance) for y in ys]))
    rx, ry = red
    t_pairs, ref = timed(lambda: np.array([[ref_cca(a, b).mean() for b in ry] for a in rx]))
    t_ref = t_red + t_pairs
    rows.append(("SVCCA", f"reduce once/layer ({t_red:.1f}s) + svcca per pair, numpy f64", t_ref, None, 0.0))
    for x64 in (False, True):
        t, first, v = ours("svcca", x64, keep_variance=args.keep_variance)
        rows.append(("SVCCA", f"pairwise {'f64' if x64 else 'f32'} (first call {first:.1f}s)", t, t_ref / t,
                     float(np.max(np.abs(v - ref)))))

    # ---- linear CKA
    t_ref, ref = timed(lambda: np.array([[ref_linear_cka(x, y) for y in ys] for x in xs]))
    rows.append(("linear CKA", "feature-space formula, numpy f64, per pair", t_ref, None, 0.0))
    S.linear_cka(xs[0], ys[0])  # compile the single-pair function for one shape; others compile in the loop
    t_loop, loop = timed(lambda: np.array([[float(S.linear_cka(x, y)) for y in ys] for x in xs]))
    t_loop2, _ = timed(lambda: np.array([[float(S.linear_cka(x, y)) for y in ys] for x in xs]))  # compiled now
    rows.append(("linear CKA", "our jitted linear_cka, Python loop over pairs, f32", t_loop2, t_ref / t_loop2,
                 float(np.max(np.abs(loop - ref)))))
    for x64 in (False, True):
        t, first, v = ours("linear_cka", x64)
        rows.append(("linear CKA", f"pairwise {'f64' if x64 else 'f32'} (first call {first:.1f}s)", t, t_ref / t,
                     float(np.max(np.abs(v - ref)))))
        rows[-1] = rows[-1][:4] + (rows[-1][4],) + (t_loop2 / t,)

    # ---- what bounds it: the cross products X_iᵀY_j every pair needs, against this machine's GEMM rate
    a = jnp.asarray(np.random.default_rng(2).normal(size=(args.n, max(widths))).astype(np.float32))
    gemm = jax.jit(lambda u, v: u.T @ v)
    gemm(a, a).block_until_ready()
    t_gemm, _ = timed(lambda: gemm(a, a), 3)
    peak = 2 * args.n * max(widths) ** 2 / t_gemm / 1e9
    a64 = np.asarray(a, np.float64)
    np_rate = {dt: 2 * args.n * max(widths) ** 2 / timed(lambda: b.T @ b, 3)[0] / 1e9
               for dt, b in (("f64", a64), ("f32", a64.astype(np.float32)))}
    print(f"GEMM rates, ({args.n}x{max(widths)})ᵀ times itself: XLA f32 {peak:.0f} GFLOP/s; numpy's BLAS "
          f"f64 {np_rate['f64']:.0f}, f32 {np_rate['f32']:.0f} GFLOP/s")
    cross = 2 * args.n * sum(widths) ** 2 / 1e9
    lin = next(r for r in rows if r[1].startswith("pairwise f32") and r[0] == "linear CKA")
    print(f"\nbound: the {L * L} cross products X_iᵀY_j alone are {cross:.1f} GFLOP; f32 GEMM ({args.n}x{max(widths)})ᵀ "
          f"on this machine runs {peak:.1f} GFLOP/s, so >= {cross / peak:.2f} s for any implementation that forms "
          f"them; linear CKA pairwise f32 reached {cross / lin[2]:.1f} GFLOP/s overall")

    # ---- where mean CCA's time goes: per-layer SVDs (prepare), cross products, per-pair k×k SVDs (compare)
    prepare = S.metric("mean_cca")[0]
    layers = [jnp.asarray(a, jnp.float32) for a in xs + ys]
    prep = jax.jit(lambda ls: [prepare(a).u for a in ls])
    prep(layers)
    t_prep, us = timed(lambda: prep(layers), 2)
    cross = jax.jit(lambda a, b: [[u.T @ v for v in b] for u in a])
    cross(us[:L], us[L:])
    t_cross, blocks = timed(lambda: cross(us[:L], us[L:]), 2)
    # One SVD per program: independent LAPACK calls in one program can deadlock jaxlib 0.10.2 on few cores.
    one = jax.jit(lambda c: jnp.linalg.svd(c, compute_uv=False))
    for row in blocks:
        for c in row:
            one(c).block_until_ready()
    t_svd, _ = timed(lambda: [one(c) for row in blocks for c in row], 2)
    print(f"mean CCA f32 parts: {2 * L} per-layer SVDs {t_prep:.2f} s, {L * L} cross products {t_cross:.2f} s, "
          f"{L * L} per-pair singular-value decompositions {t_svd:.2f} s")

    print(f"\n{'metric':<11} {'implementation':<58} {'seconds':>8} {'speed-up':>9} {'max |diff|':>11} "
          f"{'vs loop':>8}")
    for r in rows:
        sp = f"{r[3]:8.1f}x" if r[3] else " " * 9
        vl = f"{r[5]:7.1f}x" if len(r) > 5 else ""
        print(f"{r[0]:<11} {r[1]:<58} {r[2]:8.2f} {sp} {r[4]:11.2e} {vl:>8}")


if __name__ == "__main__":
    main()
