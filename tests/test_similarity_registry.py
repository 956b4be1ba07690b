"""The similarity registry: one call adds a metric that ``metric``/``pairwise``, the per-level analyses and the
experiments' ``--metrics`` then know; presets name fixed options. The metric registered here is the cosine of two
Gram matrices, centred or not (centred, it is linear CKA; uncentred, the RV-like cosine), checked against float64
formulas written here."""
from __future__ import annotations

import functools
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import similarity as sim_exp
from jaxprune import analysis
from jaxprune import similarity as S

pw = importlib.import_module("jaxprune.similarity.pairwise")  # the module (the package exports the function)


@pytest.fixture
def registry():
    """The registry as it was before the test (registrations are global by design)."""
    saved_options, saved_presets = dict(pw._OPTIONS), dict(pw.PRESETS)
    yield
    pw._OPTIONS.clear()
    pw._OPTIONS.update(saved_options)
    pw.PRESETS.clear()
    pw.PRESETS.update(saved_presets)


@functools.lru_cache(maxsize=None)
def gram_cosine_metric(centred: bool = True):
    def prepare(x):  # (n, p) -> (n, n) Gram of the unit-scaled (and centred) layer
        x = x / jnp.max(jnp.abs(x))
        x = x - x.mean(0) if centred else x
        return x @ x.T

    def compare(k, l):
        return jnp.vdot(k, l) / (jnp.sqrt(jnp.vdot(k, k)) * jnp.sqrt(jnp.vdot(l, l)))

    return prepare, compare


def gram_cosine_f64(x, y, centred):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if centred:
        x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return float(np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l)))


def register_gram_cosine():
    S.register_similarity("gram_cosine", gram_cosine_metric, {"centred": (True, bool)})


def layers(seed, n, widths):
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.normal(size=(n, w)), 0).astype(np.float32) + 0.1 * i for i, w in enumerate(widths)]


def test_a_registered_similarity_works_in_pairwise_against_its_float64_formula(registry):
    register_gram_cosine()
    assert "gram_cosine" in S.SIMILARITIES and S.PRESETS["gram_cosine"] == ("gram_cosine", {})
    xs, ys = layers(0, 40, (5, 7, 5)), layers(1, 40, (6, 3))
    for centred in (True, False):
        got = np.asarray(S.pairwise("gram_cosine", xs, ys, centred=centred))
        want = [[gram_cosine_f64(x, y, centred) for y in ys] for x in xs]
        np.testing.assert_allclose(got, want, atol=2e-6)
    # centred, it is linear CKA: the registry's metric and the built-in one agree
    np.testing.assert_allclose(np.asarray(S.pairwise("gram_cosine", xs, ys)),
                               np.asarray(S.pairwise("linear_cka", xs, ys)), atol=2e-6)
    # uncentred, it is not invariant to translation while CKA is (the test can tell the two apart)
    assert abs(gram_cosine_f64(xs[0], ys[0], False) - gram_cosine_f64(xs[0], ys[0], True)) > 1e-2


def test_a_preset_reaches_the_analyses_and_the_experiment_flags(registry):
    register_gram_cosine()
    S.register_preset("gram_cosine_raw", "gram_cosine", centred=False)
    assert analysis.SIMILARITY_METRICS["gram_cosine_raw"] == ("gram_cosine", {"centred": False})
    reps, dense = {"a": layers(2, 30, (4,))[0]}, {"a": layers(3, 30, (4,))[0]}
    got = analysis.similarity_to_dense(reps, dense, ["gram_cosine_raw", "gram_cosine"])
    np.testing.assert_allclose(got["gram_cosine_raw"]["a"], gram_cosine_f64(reps["a"], dense["a"], False), atol=2e-6)
    np.testing.assert_allclose(got["gram_cosine"]["a"], gram_cosine_f64(reps["a"], dense["a"], True), atol=2e-6)
    c = sim_exp.check_config({"imp_workdir": "/nonexistent", "metrics": ["gram_cosine_raw", "linear_cka"]})
    assert c["metrics"] == ["gram_cosine_raw", "linear_cka"]


def test_registration_errors_name_the_argument(registry):
    register_gram_cosine()
    with pytest.raises(ValueError, match=r"name='gram_cosine': expected a new"):
        register_gram_cosine()
    with pytest.raises(ValueError, match=r"name='linear_cka': expected a new"):
        S.register_similarity("linear_cka", gram_cosine_metric)
    with pytest.raises(TypeError, match="factory: expected a callable"):
        S.register_similarity("other", 3)
    with pytest.raises(ValueError, match=r"options: \['centred'\] must map to \(default, validator\)"):
        S.register_similarity("other", gram_cosine_metric, {"centred": True})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bandwidth'\]"):
        S.register_preset("gc_bad", "gram_cosine", bandwidth=2.0)
    with pytest.raises(ValueError, match=r"label='nbs': expected a new"):
        S.register_preset("nbs", "gram_cosine")
    with pytest.raises(ValueError, match=r"metric='nope': expected one of"):
        S.register_preset("gc_nope", "nope")
    assert "gc_bad" not in S.PRESETS and "other" not in S.SIMILARITIES


def test_the_builtin_presets_keep_their_names_order_and_options():
    """Run identities store the --metrics default: its order and content must not drift."""
    assert list(analysis.SIMILARITY_METRICS) == ["mean_cca", "svcca", "pwcca", "pwcca_svcca", "linear_cka",
                                                 "linear_cka_debiased", "rbf_cka", "nbs"]
    assert analysis.SIMILARITY_METRICS["pwcca_svcca"] == ("pwcca", {"svcca_compatible": True})
    assert tuple(S.SIMILARITIES) == ("mean_cca", "svcca", "pwcca", "linear_cka", "rbf_cka", "nbs")
