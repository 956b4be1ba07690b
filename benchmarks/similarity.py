"""All layer pairs of two 7-layer networks: ``similarity.pairwise`` (one call) against per-pair loops.

    python -m benchmarks.similarity                 # n = 5000, widths 1000 … 50 (the issue's setting)
    python -m benchmarks.similarity --n=1000 --widths=200,150,100,80,50,20,10   # quick

Reference: google/svcca's algorithm, per pair, in numpy float64, as its ``get_cca_similarity`` computes one pair
(covariance of the stacked neurons rescaled by its largest entry, pseudo-inverses, inverse square roots by
``eigh``, full SVD of the whitened cross-covariance → canonical correlations; the bookkeeping it adds — coefficient
copies, neuron means — is left out). SVCCA: each pair reduces both layers by SVD to 99 % variance and then runs that
CCA (a per-pair loop, as svcca's tutorials do one pair); a second row hoists the reductions out of the loop (once
per layer). Linear CKA: Kornblith et al.'s feature-space formula per pair (numpy float64), and a Python loop over
pairs of our jitted ``linear_cka``. Ours is timed in float32 (the default) and float64 (x64), best of
``--repeats`` calls after a compiling one; the references best of ``--ref_repeats`` runs (the per-pair SVCCA loop
once). Accuracy is the largest |ours - reference| over the 49 pairs. The floor line times the kernels our routes
cannot avoid, each alone, and this run's reference time over their sum (the ratio a route with no other
cost would reach; kernels timed alone vary with the machine like everything else).
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import similarity as S
from jaxprune.similarity import _linalg, cca_pairs


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
    """Canonical correlations of ``x (n, p1)``, ``y (n, p2)`` computed as svcca's ``get_cca_similarity`` does."""
    p1 = x.shape[1]
    c = np.cov(x.T, y.T)
    sxx, sxy, syy = c[:p1, :p1], c[:p1, p1:], c[p1:, p1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    ixx, iyy = _msqrt(np.linalg.pinv(sxx)), _msqrt(np.linalg.pinv(syy))
    _, s, _ = np.linalg.svd(ixx @ sxy @ iyy)  # svcca keeps u and v: its CCA coefficients
    return np.abs(s)


def ref_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(frac >= keep)) + 1
    return u[:, :k] * s[:k]


def ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.sum((x.T @ y) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def kernel_floor(layers: tuple, num_x: int) -> dict[str, float]:
    """Seconds of the kernels the all-pairs routes cannot avoid, each alone (float32, best of 2): per layer the
    Gram ``X̃ᵀX̃``, ``X̃R₁⁻¹`` (trsm) and the second Gram (CholeskyQR2); every cross product as one GEMM; the 49
    block SVDs (serial); linear CKA's self terms ``‖X̃ᵀX̃‖²_F``. No casting, copies, Choleskys or bookkeeping."""
    xc = [x - jnp.mean(x, 0) for x in layers]
    grams = jax.jit(lambda a: [_linalg.gram(x) for x in a])
    r1 = [_linalg.upper_cholesky(g) for g in grams(xc)]
    right = functools.partial(_linalg.solve_upper, right=True)
    solve = lambda a, r: (lambda s: [s.op(right, u, v) for v, u in zip(a, r)])(_linalg.Serial())
    q = jax.jit(solve)(xc, r1)
    solve_only = jax.jit(lambda a, r: [jnp.sum(b[0]) for b in solve(a, r)])  # no n × p results leave the program
    qx, qy = jnp.concatenate(q[:num_x], 1), jnp.concatenate(q[num_x:], 1)
    cross = jax.jit(lambda a, b: a.T @ b)
    m = cross(qx, qy)
    ox, oy = np.cumsum([0] + [a.shape[1] for a in q[:num_x]]), np.cumsum([0] + [a.shape[1] for a in q[num_x:]])
    blocks = [m[ox[a]:ox[a + 1], oy[b]:oy[b + 1]] for a in range(num_x) for b in range(len(oy) - 1)]
    blocks = [b if b.shape[0] >= b.shape[1] else b.T for b in blocks]
    svds = jax.jit(lambda bs: (lambda s: [s(lambda b: jnp.linalg.svd(b, compute_uv=False), b) for b in bs])(
        _linalg.Serial()))
    self_terms = jax.jit(lambda a: [_linalg.gram_sq_norm(x) for x in a])
    fx, fy = jnp.concatenate(xc[:num_x], 1), jnp.concatenate(xc[num_x:], 1)
    def t(f):
        jax.block_until_ready(f())  # compile
        return timed(f, 2)[0]

    return {"gram": t(lambda: grams(xc)), "trsm": t(lambda: solve_only(xc, r1)), "gram2": t(lambda: grams(q)),
            "cross": t(lambda: cross(qx, qy)), "svds": t(lambda: svds(blocks)),
            "cka_cross": t(lambda: cross(fx, fy)), "cka_self": t(lambda: self_terms(xc))}


def compile_seconds(jitted, *args) -> float:
    """Seconds to lower and compile ``jitted`` for ``args`` from empty caches (what a first call pays)."""
    jax.clear_caches()
    t = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t


def timed(fn, repeats: int = 1):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best, out


def parts(xs: list[np.ndarray], ys: list[np.ndarray], keep_variance: float) -> tuple:
    """Where the all-pairs route spends its time (f32): the per-layer conditioning program (Gram, Cholesky, κ
    estimates), then the all-pairs program (the rest of CholeskyQR2, the cross GEMM, the block SVDs); run time
    (best of 2) and compile time of each. Returns the float32 layers."""
    layers = tuple(jnp.asarray(a, jnp.float32) for a in xs + ys)
    for kind, keep in (("mean_cca", None), ("svcca", keep_variance)):
        cond = lambda: cca_pairs._condition(layers, kind, keep, None)
        factors = cond()
        plan = (cca_pairs.routes(kind, layers, factors, None), len(xs), False)
        pairs = lambda: cca_pairs._all_pairs(layers, factors, plan, kind, keep, None, None)
        pairs()
        run = timed(cond, 2)[0], timed(pairs, 2)[0]
        comp = (compile_seconds(cca_pairs._condition, layers, kind, keep, None),
                compile_seconds(cca_pairs._all_pairs, layers, factors, plan, kind, keep, None, None))
        print(f"{kind} f32 parts: per-layer conditioning {run[0]:.2f} s (compile {comp[0]:.1f} s), all pairs "
              f"{run[1]:.2f} s (compile {comp[1]:.1f} s) (routes: {sum(f for f, _ in plan[0])} of {len(layers)} "
              "layers CholeskyQR2)")
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--widths", default="1000,800,500,300,200,100,50")
    ap.add_argument("--keep_variance", type=float, default=0.99)
    ap.add_argument("--repeats", type=int, default=3, help="our timings: best of this many calls")
    ap.add_argument("--ref_repeats", type=int, default=2,
                    help="reference timings: best of this many runs (mean CCA, hoisted SVCCA, linear CKA); the "
                         "per-pair SVCCA reference (~1 min) runs once")
    ap.add_argument("--parts_only", action="store_true",
                    help="only the f32 all-pairs programs' run and compile times (no references, no table)")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    xs, ys = synthetic(args.n, widths, 0), synthetic(args.n, widths, 1)
    L = len(widths)
    print(f"n={args.n} widths={widths} ({L}x{L} pairs), jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.parts_only:
        return parts(xs, ys, args.keep_variance)
    rows = []

    def ours(metric: str, x64: bool, **kw):
        with jax.enable_x64(x64):
            t0 = time.perf_counter()
            jax.block_until_ready(S.pairwise(metric, xs, ys, **kw))  # compile + first run
            first = time.perf_counter() - t0
            t, v = timed(lambda: S.pairwise(metric, xs, ys, **kw), args.repeats)
        return t, first, np.asarray(v)

    def add_ours(name: str, metric: str, refs: list[tuple[float, np.ndarray]], **kw):
        for x64 in (False, True):
            t, first, v = ours(metric, x64, **kw)
            rows.append((name, f"pairwise {'f64' if x64 else 'f32'} (first call {first:.1f} s)", t,
                         [t_ref / t for t_ref, _ in refs], float(np.max(np.abs(v - refs[0][1])))))

    # ---- mean CCA on the raw layers
    t_ref, ref = timed(lambda: np.array([[ref_cca(x, y).mean() for y in ys] for x in xs]), args.ref_repeats)
    rows.append(("mean CCA", "svcca algorithm, numpy f64, per pair", t_ref, None, 0.0))
    add_ours("mean CCA", "mean_cca", [(t_ref, ref)])

    # ---- SVCCA: per pair (both layers reduced inside the loop), and with the reductions hoisted (once per layer)
    keep = args.keep_variance
    t_pp, ref = timed(lambda: np.array([[ref_cca(ref_reduce(x, keep), ref_reduce(y, keep)).mean() for y in ys]
                                        for x in xs]))
    rows.append(("SVCCA", "SVD-reduce + svcca algorithm, numpy f64, per pair", t_pp, None, 0.0))
    t_red, (rx, ry) = timed(lambda: ([ref_reduce(x, keep) for x in xs], [ref_reduce(y, keep) for y in ys]),
                            args.ref_repeats)
    t_pairs, ref2 = timed(lambda: np.array([[ref_cca(a, b).mean() for b in ry] for a in rx]), args.ref_repeats)
    rows.append(("SVCCA", f"same, reductions hoisted: once/layer ({t_red:.1f} s) + per pair", t_red + t_pairs, None,
                 float(np.max(np.abs(ref2 - ref)))))
    add_ours("SVCCA", "svcca", [(t_pp, ref), (t_red + t_pairs, ref2)], keep_variance=keep)

    # ---- linear CKA
    t_ref, ref = timed(lambda: np.array([[ref_linear_cka(x, y) for y in ys] for x in xs]), args.ref_repeats)
    rows.append(("linear CKA", "feature-space formula, numpy f64, per pair", t_ref, None, 0.0))
    S.linear_cka(xs[0], ys[0])  # compile the single-pair function for one shape; others compile in the loop
    timed(lambda: np.array([[float(S.linear_cka(x, y)) for y in ys] for x in xs]))
    t_loop, loop = timed(lambda: np.array([[float(S.linear_cka(x, y)) for y in ys] for x in xs]))  # compiled now
    rows.append(("linear CKA", "our jitted linear_cka, Python loop over pairs, f32", t_loop, [t_ref / t_loop],
                 float(np.max(np.abs(loop - ref)))))
    add_ours("linear CKA", "linear_cka", [(t_ref, ref), (t_loop, ref)])

    # ---- this machine's GEMM rates (distinct operands: numpy turns aᵀa into a half-cost syrk)
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(args.n, max(widths))) for _ in range(2))
    gemm = jax.jit(lambda u, v: u.T @ v)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    gemm(a32, b32).block_until_ready()
    flops = 2 * args.n * max(widths) ** 2
    xla = flops / timed(lambda: gemm(a32, b32), 3)[0] / 1e9
    npr = {dt: flops / timed(lambda: u.T @ v, 3)[0] / 1e9 for dt, (u, v) in
           (("f64", (a, b)), ("f32", (a.astype(np.float32), b.astype(np.float32))))}
    print(f"GEMM rates, ({args.n}x{max(widths)})ᵀ({args.n}x{max(widths)}): XLA f32 {xla:.0f} GFLOP/s; numpy's "
          f"BLAS f64 {npr['f64']:.0f}, f32 {npr['f32']:.0f} GFLOP/s")
    narrow = {}
    for w in (128, 500):  # the per-layer passes run at these widths' rates
        u32, v32 = a32[:, :w] + 0, b32[:, :w] + 0
        gemm(u32, v32).block_until_ready()
        narrow[w] = 2 * args.n * w * w / timed(lambda: gemm(u32, v32), 5)[0] / 1e9
    print("XLA f32 at narrower widths, (n x w)ᵀ(n x w): " + ", ".join(f"w={w} {r:.0f}" for w, r in narrow.items())
          + " GFLOP/s")
    cross = 2 * args.n * sum(widths) ** 2 / 1e9
    print(f"the {L * L} cross products alone are {cross:.1f} GFLOP: >= {cross / xla:.2f} s at XLA's f32 rate")
    layers = parts(xs, ys, args.keep_variance)
    k = kernel_floor(layers, L)
    ref = {r[0]: r[2] for r in reversed(rows) if r[3] is None}  # first reference row of each metric
    cca_floor = k["gram"] + k["trsm"] + k["gram2"] + k["cross"] + k["svds"]
    cka_floor = k["cka_cross"] + k["cka_self"]
    print(f"floor, the unavoidable float32 kernels alone: mean CCA {cca_floor:.2f} s (Gram {k['gram']:.2f} + trsm "
          f"{k['trsm']:.2f} + Gram {k['gram2']:.2f} + cross GEMM {k['cross']:.2f} + {L * L} SVDs {k['svds']:.2f}), "
          f"reference/floor {ref['mean CCA'] / cca_floor:.1f}x; linear CKA {cka_floor:.2f} s (cross GEMM "
          f"{k['cka_cross']:.2f} + self terms {k['cka_self']:.2f}), reference/floor "
          f"{ref['linear CKA'] / cka_floor:.1f}x")

    print(f"\n{'metric':<11} {'implementation':<62} {'seconds':>8}  speed-up vs the rows above   max |diff|")
    for r in rows:
        sp = "  ".join(f"{v:6.1f}x" for v in r[3]) if r[3] else ""
        print(f"{r[0]:<11} {r[1]:<62} {r[2]:8.2f}  {sp:<28} {r[4]:10.2e}")

    # The targets, on our float32 rows against the first reference row of each metric.
    print("\ntargets (float32 pairwise against the per-pair reference):")
    for name, target in (("mean CCA", 10.0), ("SVCCA", 10.0), ("linear CKA", 5.0)):
        r = next(r for r in rows if r[0] == name and r[1].startswith("pairwise f32"))
        ok = r[3][0] >= target and r[4] <= 1e-5
        print(f"  {name:<11} {r[3][0]:5.1f}x (>= {target:.0f}x), max |diff| {r[4]:.1e} (<= 1e-5): "
              f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
