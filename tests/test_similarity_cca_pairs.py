"""The all-pairs route of mean CCA and SVCCA (CholeskyQR2, Gram eigendecomposition): its dense building blocks,
which route each layer takes, agreement with the SVD route to rounding in float64, and float32 accuracy against
float64 references written from the definition."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import similarity as S
from jaxprune.similarity import _linalg, cca_pairs
from tests.test_similarity import x64  # noqa: F401 (fixture)


def relu_layers(seed: int, n: int, widths, noise: float = 0.3) -> list[np.ndarray]:
    """ReLU layers driven by one decaying latent: full rank, condition numbers of tens to ~100."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 12)) * 0.8 ** np.arange(12)
    return [np.maximum(z @ rng.normal(size=(12, w)) + noise * rng.normal(size=(n, w)), 0) for w in widths]


def ref_correlations(x, y, keep: float | None = None) -> np.ndarray:
    """float64 canonical correlations from the definition: cosines of the principal angles between the centred
    column spaces (orthonormal bases by SVD, optionally cut to the leading directions holding ``keep``)."""
    def basis(a):
        u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
        if keep is None:
            return u
        frac = np.cumsum(s**2) / np.sum(s**2)
        return u[:, : int(np.argmax(frac >= keep)) + 1]

    return np.linalg.svd(basis(x).T @ basis(y), compute_uv=False)


# ------------------------------------------------------------------------------------------ dense building blocks
@pytest.mark.parametrize("p", [3, 512, 513, 700, 1100])
def test_half_cost_products_equal_plain_products(p, x64):
    rng = np.random.default_rng(p)
    x = rng.normal(size=(40, p))
    np.testing.assert_allclose(_linalg.gram(jnp.asarray(x)), x.T @ x, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(_linalg.gram_sq_norm(jnp.asarray(x)), np.sum((x.T @ x) ** 2), rtol=1e-12)


@pytest.mark.parametrize("shape", [(7, 3), (300, 64)])
def test_triangular_solves_invert_the_upper_factor(shape, x64):
    m, p = shape
    rng = np.random.default_rng(m)
    r = np.triu(rng.normal(size=(p, p))) + 3.0 * np.eye(p)
    b, c = rng.normal(size=(p, m)), rng.normal(size=(m, p))
    R = jnp.asarray(r)
    np.testing.assert_allclose(r @ np.asarray(_linalg.solve_upper(R, jnp.asarray(b))), b, atol=1e-10)
    np.testing.assert_allclose(r.T @ np.asarray(_linalg.solve_upper(R, jnp.asarray(b), transpose=True)), b, atol=1e-10)
    np.testing.assert_allclose(np.asarray(_linalg.solve_upper(R, jnp.asarray(c), right=True)) @ r, c, atol=1e-10)


def test_serial_calls_depend_on_the_previous_result_values_unchanged(monkeypatch):
    """The deadlock guard's dependency: ``serial(fn, …)`` gates every floating argument on the previous result,
    ``serial.op`` only the smallest (its consumer is one op reading all of them); integers and values untouched.
    Active on jaxlib <= 0.11.0 only; forced on here so that it is tested on every version."""
    monkeypatch.setattr(_linalg, "_SERIALISE", True)
    big, small, count = jnp.arange(12.0).reshape(4, 3), jnp.ones((2, 2)), jnp.asarray(3)

    def gated(smallest_only):
        def run(token, a, b, c):
            serial = _linalg.Serial()
            serial.token = token
            return (serial.op if smallest_only else serial)(lambda *args: args, a, b, c)
        jaxpr = jax.make_jaxpr(run)(jnp.float32(1.0), big, small, count).jaxpr
        outs = jax.jit(run)(jnp.float32(np.inf), big, small, count)  # a non-finite token still adds exactly 0
        for got, want in zip(outs, (big, small, count)):
            np.testing.assert_array_equal(got, want)
        gated_shapes = {tuple(e.outvars[0].aval.shape) for e in jaxpr.eqns if e.primitive.name == "add"}
        return gated_shapes

    assert gated(False) == {(4, 3), (2, 2)}
    assert gated(True) == {(2, 2)}


def test_serialisation_is_a_pass_through_where_jaxlib_does_not_deadlock(monkeypatch):
    """jaxlib 0.10.2 and 0.11.0 deadlock on concurrent LAPACK calls, 0.11.1+ do not (BUILD-notes): there
    ``after`` returns its argument itself and a ``Serial`` program has no extra ops."""
    import re

    import jaxlib
    release = tuple(int(re.match(r"\d*", v).group() or 0) for v in jaxlib.__version__.split(".")[:3])
    assert _linalg._SERIALISE == (release < (0, 11, 1))
    monkeypatch.setattr(_linalg, "_SERIALISE", False)
    x = (jnp.ones((3, 2)), jnp.arange(3))
    assert _linalg.after(x, jnp.float32(1.0)) is x

    def run(a, b):
        serial = _linalg.Serial()
        return serial(jnp.linalg.cholesky, serial(lambda m: m @ m.T + 3 * jnp.eye(3), a)), serial.op(jnp.sin, b)
    eqns = jax.make_jaxpr(run)(jnp.ones((3, 3)), jnp.ones((2,))).jaxpr.eqns
    assert not [e for e in eqns if e.primitive.name == "add" and e.outvars[0].aval.shape == (2,)]


@pytest.mark.parametrize("kappa", [1.0, 30.0, 1e3, 1e6])
def test_condition_estimate_is_a_close_lower_bound(kappa, x64):
    rng = np.random.default_rng(int(kappa))
    p = 60
    q1, _ = np.linalg.qr(rng.normal(size=(200, p)))
    q2, _ = np.linalg.qr(rng.normal(size=(p, p)))
    x = (q1 * np.geomspace(1.0, 1.0 / kappa, p)) @ q2.T
    r = np.linalg.cholesky(x.T @ x).T
    est = float(cca_pairs._kappa_estimate(jnp.asarray(r)))
    true = np.linalg.cond(r)
    assert true / 3 <= est <= true * (1 + 1e-8)


def test_condition_estimate_buckets_by_hand():
    """Widest first; a layer joins the open group while the padding (group width² − width²) fits the remaining
    budget of 0.25·Σ width² (here 0.25 · 4.065e6 = 1.016e6): 800s cost 0.36e6 each into the 1000 group (0.296e6
    left); a 500 would cost 0.75e6 → new group; one 300 fits (0.16e6, 0.136e6 left), the next not → new group,
    the 200s cost 0.05e6 each (0.036e6 left); a 100 would cost 0.08e6 → new group, which takes the rest."""
    widths = [1000, 800, 500, 300, 200, 100, 50] * 2
    assert cca_pairs._buckets(widths) == [[0, 7, 1, 8], [2, 9, 3], [10, 4, 11], [5, 12, 6, 13]]
    assert cca_pairs._buckets([7]) == [[0]] and cca_pairs._buckets([]) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=12), st.sampled_from([0.0, 0.25, 1.0]))
def test_condition_estimate_buckets_partition_within_the_padding_budget(widths, slack):
    groups = cca_pairs._buckets(widths, slack)
    assert sorted(i for g in groups for i in g) == list(range(len(widths)))
    assert all(widths[g[0]] == max(widths[i] for i in g) for g in groups)
    padded = sum(len(g) * widths[g[0]] ** 2 for g in groups)
    assert padded <= (1 + slack) * sum(w * w for w in widths)
    if slack == 0.0:  # no padding at all: equal widths only
        assert all(len({widths[i] for i in g}) == 1 for g in groups)


def test_batched_condition_estimates_equal_the_single_ones(x64):
    """Padded to blockdiag(r, I) and estimated in one vmapped call per group, each estimate equals the unpadded
    one to rounding (still a close lower bound of the true κ); a failed Cholesky (NaN) spoils only its own."""
    rng = np.random.default_rng(5)
    widths, kappas = (64, 60, 56, 9), (10.0, 1e3, 50.0, 4.0)
    rs = []
    for p, kappa in zip(widths, kappas):
        q1, _ = np.linalg.qr(rng.normal(size=(3 * p, p)))
        q2, _ = np.linalg.qr(rng.normal(size=(p, p)))
        x = (q1 * np.geomspace(1.0, 1.0 / kappa, p)) @ q2.T
        rs.append(np.linalg.cholesky(x.T @ x).T)
    rs[1] = np.full_like(rs[1], np.nan)
    assert cca_pairs._buckets(widths) == [[0, 1, 2], [3]]  # padding happens in the first group
    got = jax.jit(lambda a: cca_pairs._kappa_estimates(_linalg.Serial(), a))([jnp.asarray(r) for r in rs])
    assert np.isnan(float(got[1]))
    for i in (0, 2, 3):
        single = float(cca_pairs._kappa_estimate(jnp.asarray(rs[i])))
        np.testing.assert_allclose(float(got[i]), single, rtol=1e-10)
        assert np.linalg.cond(rs[i]) / 3 <= float(got[i]) <= np.linalg.cond(rs[i]) * (1 + 1e-8)


# ------------------------------------------------------------------------------------------------------ routes
def _factor(kind: str, *layers, keep: float | None = None):
    layers = tuple(jnp.asarray(a, jnp.float32) for a in layers)
    fs = cca_pairs._condition(layers, kind, keep, None)
    return fs, cca_pairs.routes(kind, layers, fs, None)


def test_cholesky_qr2_basis_is_orthonormal_and_spans_the_layer():
    """Well-conditioned layer: the CholeskyQR2 route, q R₂⁻¹ orthonormal to float32 rounding, spanning the centred
    layer; R₂ a small correction (≠ I)."""
    x = relu_layers(0, 2000, (300,))[0]
    (f,), (route,) = _factor("mean_cca", x)
    xc = jnp.asarray(x - x.mean(0), jnp.float32)
    q, r2 = jax.jit(lambda a, r: cca_pairs._cholesky_qr2(_linalg.Serial(), a, r))(xc, f.r1)
    r2 = np.asarray(r2, np.float64)
    assert route == (True, 300) and np.max(np.abs(r2 - np.eye(300))) > 1e-6
    b = np.linalg.solve(r2.T, np.asarray(q, np.float64).T).T  # q R₂⁻¹
    np.testing.assert_allclose(b.T @ b, np.eye(300), atol=1e-5)  # float32: a few √p·eps
    xc = x - x.mean(0)
    assert np.linalg.norm(xc - b @ (b.T @ xc)) < 1e-5 * np.linalg.norm(xc)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_routes_follow_conditioning():
    good = relu_layers(1, 1500, (200, 80))
    dead = good[0].copy()
    dead[:, :5] = 0.0  # exactly rank-deficient: CholeskyQR breaks down
    graded = np.random.default_rng(0).normal(size=(1500, 40)) * np.geomspace(1, 1e-4, 40)  # κ ≈ 1e4
    wide = relu_layers(2, 50, (120,))[0]  # p > n
    for kind in ("mean_cca", "svcca"):
        fs, r = _factor(kind, *good, dead, graded, keep=0.99 if kind == "svcca" else None)
        assert [fast for fast, _ in r] == [True, True, False, False]
        assert [w for _, w in r[2:]] == [200, 40]
        assert _factor(kind, wide)[1] == ((False, 50),)
    (f,), ((fast, width),) = _factor("svcca", good[0], keep=0.99)
    k_ref = int(np.argmax(np.cumsum(np.linalg.svd(good[0] - good[0].mean(0), compute_uv=False) ** 2)
                          / np.sum((good[0] - good[0].mean(0)) ** 2) >= 0.99)) + 1
    assert fast and int(f.k) == k_ref and width % 32 == 0 and k_ref <= width < k_ref + 32


def test_svcca_subspace_as_accurate_as_a_thin_svd():
    """The SVCCA basis (q R₂⁻¹ U_R, k columns) against float64's leading left singular vectors: principal angles
    as small as those of float32's own thin SVD (a Gram eigendecomposition would be off by ~0.5 rad here)."""
    x = relu_layers(3, 3000, (400,), noise=0.6)[0]
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    k = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.99)) + 1
    fs, r = _factor("svcca", x, keep=0.99)
    q, rank, _ = cca_pairs._basis(_linalg.Serial(), jnp.asarray(x, jnp.float32), fs[0], r[0], "svcca", 0.99, None)
    assert int(rank) == k
    cos = np.linalg.svd(u[:, :k].T @ np.asarray(q, np.float64)[:, :k], compute_uv=False)
    u32 = np.asarray(jnp.linalg.svd(jnp.asarray(x - x.mean(0), jnp.float32), full_matrices=False)[0], np.float64)
    cos32 = np.linalg.svd(u[:, :k].T @ u32[:, :k], compute_uv=False)
    assert np.mean(1 - cos) < 10 * max(np.mean(1 - cos32), 1e-7)


# ------------------------------------------------------------------------------ agreement with the SVD route
def _layer(rng, n: int, p: int, kind: str) -> np.ndarray:
    z = rng.normal(size=(n, 4))
    a = np.maximum(z @ rng.normal(size=(4, p)) + 0.5 * rng.normal(size=(n, p)), 0)
    if kind == "dead":
        a[:, 0] = 0.0
    elif kind == "low_rank":
        a = rng.normal(size=(n, 2)) @ rng.normal(size=(2, p))
    return a


@pytest.mark.slow  # ~16 s per hypothesis draw (each compiles float64 programs): the 3.12 leg runs it
@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10_000), st.integers(12, 40),
       st.lists(st.tuples(st.integers(1, 14), st.sampled_from(["plain", "dead", "low_rank"])), min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(1, 14), st.sampled_from(["plain", "dead", "low_rank"])), min_size=1, max_size=2))
def test_all_pairs_equal_single_pair_functions_in_float64(seed, n, spec_x, spec_y):
    """Every route (Gram, SVD; p > n included) gives the single-pair (SVD-route) values to rounding."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        xs = [_layer(rng, n, p, k) for p, k in spec_x]
        ys = [_layer(rng, n, p, k) for p, k in spec_y]
        for name, opts in (("mean_cca", {}), ("mean_cca", {"truncate": 0.98}), ("svcca", {"keep_variance": 0.9})):
            got = np.asarray(S.pairwise(name, xs, ys, **opts))
            single = S.mean_cca if name == "mean_cca" else S.svcca
            want = np.array([[float(single(x, y, **opts)) for y in ys] for x in xs])
            np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_stacks_and_self_comparison(x64):
    levels = [relu_layers(s, 80, (9, 5)) for s in range(3)]
    stacked = [np.stack([lv[i] for lv in levels]) for i in range(2)]
    dense = relu_layers(10, 80, (9, 5, 7))
    for name in ("mean_cca", "svcca"):
        got = np.asarray(S.pairwise(name, stacked, dense))
        assert got.shape == (3, 2, 3)
        for k in range(3):
            np.testing.assert_allclose(got[k], S.pairwise(name, levels[k], dense), atol=1e-12)
        flipped = np.asarray(S.pairwise(name, dense, stacked))
        np.testing.assert_allclose(flipped, np.swapaxes(got, 1, 2), atol=1e-12)
        own = np.asarray(S.pairwise(name, stacked))
        for k in range(3):
            np.testing.assert_allclose(own[k], S.pairwise(name, levels[k]), atol=1e-12)
            np.testing.assert_allclose(np.diag(own[k]), 1.0, atol=1e-12)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_pairwise_under_jit_takes_the_svd_route():
    xs, ys = relu_layers(3, 200, (12, 30)), relu_layers(4, 200, (20,))
    eager = {m: np.asarray(S.pairwise(m, xs, ys)) for m in ("mean_cca", "svcca")}
    for m in eager:
        traced = np.asarray(jax.jit(lambda a, b: S.pairwise(m, a, b))(xs, ys))
        np.testing.assert_allclose(traced, eager[m], atol=2e-6)


# --------------------------------------------------------------------------------------- float32 accuracy
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_float32_within_1e5_of_float64_reference():
    """The benchmark's accuracy target at a smaller size: f32 all-pairs mean CCA and SVCCA against float64
    canonical correlations from the definition."""
    xs, ys = relu_layers(5, 3000, (400, 250, 90, 30)), relu_layers(6, 3000, (300, 120, 30))
    for name, keep in (("mean_cca", None), ("svcca", 0.99)):
        got = np.asarray(S.pairwise(name, xs, ys, **({} if keep is None else {"keep_variance": keep})))
        want = np.array([[ref_correlations(x, y, keep).mean() for y in ys] for x in xs])
        np.testing.assert_allclose(got, want, atol=1e-5)
