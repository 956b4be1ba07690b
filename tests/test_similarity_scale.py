"""Scale invariance in float32: every similarity is invariant to isotropic scaling of either input by definition, so
float32 results at any scale float32 can hold the data at must equal the float64 value of the formula (numpy
references of tests/test_similarity.py, computed on the unscaled data). Issue 28's probe: ``linear_cka`` gave 0.0
for ReLU layers ×1000 (n=1000, p=512; float64 0.56), NaN at 1e10; nbs NaN at 1e18; svcca 0.45–0.89 at 1e18–1e30;
rbf_cka 0.0 at 1e-20 and 1e30."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import similarity as S
from tests.test_similarity import (_c, ref_cca, ref_cka, ref_hsic, ref_nbs, ref_pwcca, ref_pwcca_svcca_code, ref_rbf,
                                   ref_reduce, related)

SCALES = settings(max_examples=6, deadline=None)
EXTREME = (1e-20, 1e18, 1e30)  # the data below (|x| ≤ ~10) times these stays inside float32's normal range
TOL = 2e-4  # float32 against float64 on these well-conditioned layers (max |diff| at scale 1 is ~2e-5)


def _data():
    """Float32-representable float64 copies of two related layers (n=60: p=7 ReLU-like, p=5 tanh-like)."""
    x, y = related(3, n=60, p1=7, p2=5)
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


def _references(x, y) -> dict:
    """name → (float32 library call on (x, y), float64 value of its formula on the unscaled data)."""
    x0, y0 = _data()
    kx, ky = x0 @ x0.T, y0 @ y0.T
    return {
        "mean_cca": (S.mean_cca(x, y), ref_cca(x0, y0).mean()),
        "svcca": (S.svcca(x, y, 0.9), ref_cca(ref_reduce(x0, 0.9), ref_reduce(y0, 0.9)).mean()),
        "pwcca": (S.pwcca(x, y), ref_pwcca(x0, y0)),
        "pwcca_svcca": (S.pwcca(y, x, svcca_compatible=True), ref_pwcca_svcca_code(y0, x0)),
        "linear_cka": (S.linear_cka(x, y), ref_cka(kx, ky)),
        "linear_cka_debiased": (S.linear_cka(x, y, debiased=True), ref_cka(kx, ky, True)),
        "rbf_cka": (S.rbf_cka(x, y, 0.8), ref_cka(ref_rbf(x0, 0.8), ref_rbf(y0, 0.8))),
        "rbf_cka_debiased": (S.rbf_cka(x, y, debiased=True), ref_cka(ref_rbf(x0, 1.0), ref_rbf(y0, 1.0), True)),
        "nbs": (S.nbs(x, y), ref_nbs(kx, ky)),
    }


def _check(got: dict, rtol: float = 0.0):
    for name, (value, want) in got.items():
        np.testing.assert_allclose(float(value), want, atol=TOL, rtol=rtol, err_msg=name)


def _scaled(cx: float, cy: float):
    x, y = _data()
    return (x * cx).astype(np.float32), (y * cy).astype(np.float32)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@SCALES
@given(st.floats(-6, 6), st.floats(-6, 6))
def test_every_metric_is_scale_invariant_in_float32(ex, ey):
    x, y = _scaled(10.0**ex, 10.0**ey)
    _check(_references(x, y))
    np.testing.assert_allclose(S.cca(x, y), ref_cca(*_data()), atol=TOL)


@pytest.mark.parametrize("c", EXTREME)
def test_every_metric_at_extreme_scales(c):
    _check(_references(*_scaled(c, c)))
    _check(_references(*_scaled(c, 1.0)))


@SCALES
@given(st.floats(-6, 6), st.floats(-6, 6))
def test_kernel_metrics_are_scale_invariant(ek, el):
    x, y = _data()
    kx, ky = x @ x.T, y @ y.T
    k, l = (kx * 10.0**ek).astype(np.float32), (ky * 10.0**el).astype(np.float32)
    for debiased in (False, True):
        np.testing.assert_allclose(S.cka_from_grams(k, l, debiased=debiased), ref_cka(kx, ky, debiased), atol=TOL)
    np.testing.assert_allclose(S.nbs_from_grams(k, l), ref_nbs(kx, ky), atol=TOL)


def _ref_minibatch(batches_x, batches_y) -> float:
    """Nguyen et al.'s estimator: Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b))."""
    h = lambda a, b: sum(ref_hsic(p @ p.T, q @ q.T, True) for p, q in zip(a, b))
    return h(batches_x, batches_y) / np.sqrt(h(batches_x, batches_x) * h(batches_y, batches_y))


@SCALES
@given(st.floats(-6, 6), st.floats(-6, 6), st.floats(-3, 3))
def test_minibatch_cka_is_scale_invariant_also_when_batches_differ_in_scale(ex, ey, grow):
    """Batches of one layer at scales c and c·10^grow: the running per-layer scale must rescale earlier sums."""
    x, y = _data()
    bx = [x[:30] * 10.0**ex, x[30:] * 10.0 ** (ex + grow)]
    by = [y[:30] * 10.0**ey, y[30:] * 10.0**ey]
    want = _ref_minibatch(bx, by)
    got = S.minibatch_cka([([a.astype(np.float32)], [b.astype(np.float32)]) for a, b in zip(bx, by)])
    np.testing.assert_allclose(got[0, 0], want, atol=TOL)


def _pairwise_reference(name: str, x, y) -> float:
    kx, ky = _c(x) @ _c(x).T, _c(y) @ _c(y).T
    return {"mean_cca": lambda: ref_cca(x, y).mean(),
            "svcca": lambda: ref_cca(ref_reduce(x, 0.99), ref_reduce(y, 0.99)).mean(),
            "pwcca": lambda: ref_pwcca(x, y), "linear_cka": lambda: ref_cka(kx, ky),
            "rbf_cka": lambda: ref_cka(ref_rbf(x, 1.0), ref_rbf(y, 1.0)), "nbs": lambda: ref_nbs(kx, ky)}[name]()


_pairwise_jit = jax.jit(S.pairwise, static_argnums=0)  # a caller's jit: the CCA family takes the SVD route


@pytest.mark.parametrize("name", S.SIMILARITIES)
@settings(max_examples=4, deadline=None)
@given(st.lists(st.floats(-6, 6), min_size=3, max_size=3), st.booleans())
def test_pairwise_is_scale_invariant(name, exponents, under_jit):
    """Every layer at its own scale, against the float64 formula on the unscaled layers."""
    x, y = _data()
    layers = [x, y, np.maximum(x[:, :4] - 0.2, 0) + 0.1 * y[:, :4]]
    scaled = [(a * 10.0**e).astype(np.float32) for a, e in zip(layers, exponents)]
    got = np.asarray((_pairwise_jit if under_jit else S.pairwise)(name, scaled))
    want = np.array([[_pairwise_reference(name, a, b) for b in layers] for a in layers])
    np.testing.assert_allclose(got, want, atol=TOL, err_msg=name)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("c", EXTREME)
def test_pairwise_at_extreme_scales(c):
    x, y = _data()
    for name in S.SIMILARITIES:
        got = np.asarray(S.pairwise(name, [(x * c).astype(np.float32)], [y.astype(np.float32)]))[0, 0]
        np.testing.assert_allclose(got, _pairwise_reference(name, x, y), atol=TOL, err_msg=name)


def _probe_layers():
    """The issue's probe: ReLU of Gaussians, n=1000, p=512 (y a noisy mix of x's pre-activations)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1000, 512))
    y = np.maximum(z @ rng.normal(size=(512, 512)) / np.sqrt(512) + 0.5 * rng.normal(size=(1000, 512)), 0)
    return np.maximum(z, 0).astype(np.float32), y.astype(np.float32)


def test_probe_relu_layers_times_1000():
    """Fails on the code before the fix: ``sqrt(a·b)`` of ‖XᵀX‖²_F ~ 1e22 overflowed and linear CKA was 0.0."""
    x, y = _probe_layers()
    xc, yc = _c(x.astype(np.float64)), _c(y.astype(np.float64))
    want = np.sum((xc.T @ yc) ** 2) / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))  # 0.56
    assert 0.5 < want < 0.65
    for c in (1e3, 1e10):
        xs, ys = x * np.float32(c), y * np.float32(c)
        np.testing.assert_allclose(S.linear_cka(xs, ys), want, atol=1e-4)
        np.testing.assert_allclose(S.pairwise("linear_cka", [xs], [ys])[0, 0], want, atol=1e-4)
    nuclear = np.linalg.norm(xc.T @ yc, "nuc") / (np.linalg.norm(xc) * np.linalg.norm(yc))
    np.testing.assert_allclose(S.nbs(x * np.float32(1e18), y), nuclear, atol=1e-4)


# --------------------------------------------------------------------------------- no variance: NaN, one rule
@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
@pytest.mark.parametrize("constant", [0.0, 0.1, 2.5e30])
def test_a_representation_without_variance_gives_nan(constant):
    """0/0 is not a similarity: every metric gives NaN on the host and under jit, never a plausible 0 (and 0.1,
    whose float32 mean is not exactly 0.1, must not leave rounding noise that the rescaling would amplify)."""
    x, _ = _data()
    dead = np.full((60, 4), constant, np.float32)
    got = _references(dead, x.astype(np.float32))
    got.update(_references(x.astype(np.float32), dead))
    for name, (value, _) in got.items():
        assert np.isnan(float(value)), name
    assert np.all(np.isnan(S.cca(dead, x)))
    assert np.isnan(float(jax.jit(S.linear_cka)(dead, x)))
    k = np.full((60, 60), constant, np.float32)
    assert np.isnan(float(S.cka_from_grams(k, x @ x.T))) and np.isnan(float(S.nbs_from_grams(x @ x.T, k)))
    assert np.isnan(float(S.minibatch_cka([([dead], [x])])[0, 0]))


@pytest.mark.parametrize("name", S.SIMILARITIES)
def test_pairwise_nan_only_for_the_pairs_of_a_layer_without_variance(name):
    x, y = _data()
    layers = [x.astype(np.float32), np.zeros((60, 3), np.float32), y.astype(np.float32)]
    got = np.asarray(S.pairwise(name, layers))
    assert np.all(np.isnan(got[1])) and np.all(np.isnan(got[:, 1])), name
    keep = np.ix_([0, 2], [0, 2])
    np.testing.assert_allclose(got[keep], np.asarray(S.pairwise(name, [layers[0], layers[2]])), atol=1e-6)
