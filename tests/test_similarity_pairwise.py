"""All-pairs evaluation and the streaming minibatch CKA, against per-pair loops and the papers' formulas."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxprune import similarity as S
from tests.test_similarity import ALL, SINGLE, ref_cka, ref_hsic, x64  # noqa: F401 (x64: fixture)


def layers(seed: int, n: int, widths):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    return [np.maximum(z @ rng.normal(size=(5, w)) + 0.5 * rng.normal(size=(n, w)), 0) for w in widths]


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("name", ALL)
def test_pairwise_equals_per_pair_loop(name):
    xs, ys = layers(0, 60, (7, 4, 7, 9)), layers(1, 60, (4, 9, 9))
    got = np.asarray(S.pairwise(name, xs, ys))
    want = np.array([[float(SINGLE[name](x, y)) for y in ys] for x in xs])
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_single_gemm_path_against_float64_formula(debiased, x64):
    """The all-pairs linear CKA (one GEMM over concatenated layers) against the HSIC formula per pair, with a layer
    wider than n (its factor comes from an SVD) and layers of equal width (same block size)."""
    xs, ys = layers(3, 30, (4, 45, 4, 9)), layers(4, 30, (6, 2))
    got = np.asarray(S.pairwise("linear_cka", xs, ys, debiased=debiased))
    want = [[ref_cka(x @ x.T, y @ y.T, debiased) for y in ys] for x in xs]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_pairwise_options_and_self():
    xs = layers(2, 50, (6, 3, 6))
    got = np.asarray(S.pairwise("linear_cka", xs, debiased=True))
    want = np.array([[float(S.linear_cka(a, b, debiased=True)) for b in xs] for a in xs])
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=2e-5)
    np.testing.assert_allclose(got, got.T, atol=2e-5)
    got = np.asarray(S.pairwise("svcca", xs, keep_variance=0.9, truncate=0.98))
    np.testing.assert_allclose(got[0, 1], S.svcca(xs[0], xs[1], 0.9, truncate=0.98), atol=2e-5)


@pytest.mark.parametrize("seed,widths,levels", [(0, (3, 5, 3), 3), (1, (4,), 1)])
def test_pairwise_stack_of_levels(seed, widths, levels):
    """levels × layers against the dense layers = one matrix per level; both-stacked pairs level i with level i."""
    stack = [layers(seed + k, 24, widths) for k in range(levels)]
    dense = layers(seed + 99, 24, widths)
    xs = [np.stack([stack[k][l] for k in range(levels)]) for l in range(len(widths))]
    got = np.asarray(S.pairwise("nbs", xs, dense))
    assert got.shape == (levels, len(widths), len(widths))
    for k in range(levels):
        np.testing.assert_allclose(got[k], S.pairwise("nbs", stack[k], dense), atol=2e-5)
    own = np.asarray(S.pairwise("linear_cka", xs))
    for k in range(levels):
        np.testing.assert_allclose(own[k], S.pairwise("linear_cka", stack[k]), atol=2e-5)


def test_pairwise_validation():
    xs = layers(3, 30, (3, 4))
    with pytest.raises(ValueError, match="xs: expected every layer as"):
        S.pairwise("nbs", [xs[0], xs[1][None, :, :, None]], xs)
    with pytest.raises(ValueError, match="same n samples"):
        S.pairwise("nbs", [xs[0], xs[1][:20]], xs)
    with pytest.raises(ValueError, match="xs has 30 samples but ys has 20"):
        S.pairwise("nbs", xs, [x[:20] for x in xs])
    bad = xs[1].copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"ys\[1\]: 1 non-finite"):
        S.pairwise("nbs", xs, [xs[0], bad])
    with pytest.raises(ValueError, match="stack size"):
        S.pairwise("nbs", [np.stack([xs[0]] * 2), np.stack([xs[1]] * 3)])


def test_custom_metric_pair():
    xs = layers(4, 30, (3, 5))
    prepare, compare = S.metric("rbf_cka", threshold=0.5)
    np.testing.assert_allclose(S.pairwise((prepare, compare), xs)[0, 1], S.rbf_cka(xs[0], xs[1], 0.5), atol=2e-5)


# ------------------------------------------------------------------------------------------ minibatch CKA
def test_minibatch_cka_single_batch_is_debiased_linear_cka():
    xs, ys = layers(5, 64, (6, 3)), layers(6, 64, (4, 5, 2))
    got = np.asarray(S.minibatch_cka([(xs, ys)]))
    want = np.array([[float(S.linear_cka(x, y, debiased=True)) for y in ys] for x in xs])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_minibatch_cka_matches_nguyen_formula_over_batches():
    """CKA_mb = mean_b HSIC₁(K_b, L_b) / sqrt(mean_b HSIC₁(K_b, K_b) · mean_b HSIC₁(L_b, L_b)) (float64)."""
    with jax.enable_x64(True):
        xs, ys = layers(7, 90, (5, 8)), layers(8, 90, (3,))
        conv = np.random.default_rng(0).normal(size=(90, 4, 4, 2))  # a conv map: flattened per sample
        xs = xs + [conv]
        state = S.minibatch_cka_init(3, 1)
        for b in range(3):
            sl = slice(30 * b, 30 * (b + 1))
            state = S.minibatch_cka_update(state, [x[sl] for x in xs], [y[sl] for y in ys])
        got = np.asarray(S.minibatch_cka_result(state))
        flat = [x.reshape(90, -1) for x in xs]
        for i, x in enumerate(flat):
            k = [x[30 * b:30 * (b + 1)] @ x[30 * b:30 * (b + 1)].T for b in range(3)]
            l = [ys[0][30 * b:30 * (b + 1)] @ ys[0][30 * b:30 * (b + 1)].T for b in range(3)]
            num = np.mean([ref_hsic(kb, lb, True) for kb, lb in zip(k, l)])
            den = np.sqrt(np.mean([ref_hsic(kb, kb, True) for kb in k]) * np.mean([ref_hsic(lb, lb, True) for lb in l]))
            np.testing.assert_allclose(got[i, 0], num / den, atol=1e-10)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("name", ALL)
def test_pairwise_inside_jit_gives_nan_exactly_for_pairs_with_a_non_finite_layer(name):
    """Under jit the values are not checked: pairs involving a NaN/Inf layer (or stack member) are NaN, every
    other pair keeps its value (nothing leaks through the shared all-pairs products)."""
    xs, ys = layers(21, 60, (5, 3, 5)), layers(22, 60, (4, 5))
    bad = [x.copy() for x in xs]
    bad[0][4, 2] = np.nan
    want = np.asarray(S.pairwise(name, xs, ys))
    got = np.asarray(jax.jit(lambda a, b: S.pairwise(name, a, b))(bad, ys))
    assert np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-5)
    got = np.asarray(jax.jit(lambda a: S.pairwise(name, a))(bad))  # against itself: row and column 0
    assert np.isnan(got[0]).all() and np.isnan(got[:, 0]).all()
    np.testing.assert_allclose(got[1:, 1:], np.asarray(S.pairwise(name, xs[1:])), atol=1e-5)
    stacks = [np.stack([x, b]) for x, b in zip(xs, bad)]  # member 1 of layer 0 is the bad one
    got = np.asarray(jax.jit(lambda a, b: S.pairwise(name, a, b))(stacks, ys))
    assert np.isnan(got[1, 0]).all() and np.isfinite(np.delete(got.reshape(-1, len(ys)), 3, axis=0)).all()
    np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_minibatch_cka_refuses_sums_poisoned_inside_jit():
    xs = layers(23, 40, (4, 6))
    bad = [xs[0].copy(), xs[1]]
    bad[0][2, 1] = np.inf
    state = jax.jit(S.minibatch_cka_update)(S.minibatch_cka_init(2), bad)
    with pytest.raises(ValueError, match="state: non-finite HSIC sums"):
        S.minibatch_cka_result(state)


def test_minibatch_cka_self_and_errors():
    xs = layers(9, 40, (4, 6))
    got = np.asarray(S.minibatch_cka([(xs, None)]))
    np.testing.assert_allclose(np.diag(got), 1.0, atol=2e-5)
    state = S.minibatch_cka_init(2)
    with pytest.raises(ValueError, match="no batch"):
        S.minibatch_cka_result(state)
    with pytest.raises(ValueError, match="xs: expected a list of 2"):
        S.minibatch_cka_update(state, xs[:1])
    with pytest.raises(ValueError, match=r"xs\[0\]: expected at least 4"):
        S.minibatch_cka_update(state, [x[:3] for x in xs])
    with pytest.raises(ValueError, match="same batch"):
        S.minibatch_cka_update(state, [xs[0], xs[1][:20]])
