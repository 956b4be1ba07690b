"""experiments.similarity on a tiny IMP run (MLP on digits, one pruned level)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import imp as imp_exp
from experiments import similarity as exp
from jaxprune import similarity

TINY_IMP = {"dataset": "digits", "model": "mlp", "hidden": ["16", "8"], "training_steps": "30", "batch_size": 32,
            "levels": 1, "prune_fraction": 0.5, "seeds": ["0"]}
_LOAD_LEVELS = imp_exp.load_levels


@pytest.fixture(scope="module")
def imp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imp")
    imp_exp.train_and_evaluate(TINY_IMP, d)
    return d


@pytest.mark.slow
def test_run_writes_similarities_consistent_with_the_library(imp_dir, tmp_path):
    metrics = ["svcca", "linear_cka", "nbs", "pwcca_svcca"]
    r = exp.run({"imp_workdir": str(imp_dir), "num_inputs": 64, "metrics": metrics}, tmp_path)
    assert r["layers"] == ["dense_0", "dense_1", "logits"]
    assert [lv["level"] for lv in r["levels"]] == [0, 1] and r["skipped_levels"] == []
    assert r["levels"][1]["density"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "similarity.json").exists() and (tmp_path / "vs_density_nbs.png").exists()
    assert (tmp_path / "matrix_svcca_level1.png").exists()
    for m in metrics:
        mat = np.asarray(r["matrix"][m])
        assert mat.shape == (2, 3, 3)
        if m != "pwcca_svcca":  # svcca's PWCCA(X, X) < 1 with dead ReLU units: it weights their ρ = 0 directions
            np.testing.assert_allclose(np.diag(mat[0]), 1.0, atol=1e-4)  # dense vs itself
        assert all(0.0 <= v <= 1.0 + 1e-5 for vals in r["vs_dense"][m].values() for v in vals)
    # recompute entries of every metric directly from the representations, with the library call each name means
    built, variables, _ = imp_exp.load_levels(imp_dir)
    x = np.asarray(built.task.x_test[:64])
    from jaxprune import models
    reps = [models.representations(built.model, v, x) for v in variables]
    a, b, d = reps[1]["dense_1"], reps[0]["logits"], reps[0]["dense_1"]
    library = {"svcca": lambda u, v: similarity.svcca(u, v, keep_variance=0.99), "linear_cka": similarity.linear_cka,
               "nbs": similarity.nbs, "pwcca_svcca": lambda u, v: similarity.pwcca(u, v, svcca_compatible=True)}
    for m in metrics:  # matrix[level][i][j]: layer i of the level against layer j of the dense network
        np.testing.assert_allclose(r["matrix"][m][1][1][2], library[m](a, b), atol=1e-5, err_msg=m)
        np.testing.assert_allclose(r["vs_dense"][m]["dense_1"][1], library[m](a, d), atol=1e-5, err_msg=m)


@pytest.mark.slow
def test_a_run_of_several_seeds_is_compared_seed_by_seed(tmp_path, monkeypatch):
    """Each seed's levels against its own dense network; the summary is the mean and sample std over seeds."""
    d = tmp_path / "imp"
    imp_exp.train_and_evaluate({**TINY_IMP, "seeds": ["3:5"]}, d)
    metrics = ["linear_cka", "svcca"]
    r = exp.run({"imp_workdir": str(d), "num_inputs": 48, "metrics": metrics}, tmp_path / "all")
    assert r["seeds"] == [3, 4] and [p["seed"] for p in r["per_seed"]] == [3, 4]
    built, _, records = imp_exp.load_levels(d)
    x = np.asarray(built.task.x_test[:48])
    from jaxprune import conventions, models
    for i, seed in enumerate([3, 4]):
        _, variables, _ = imp_exp.load_levels(d, replica=i)
        reps = [models.representations(built.model, v, x) for v in variables]
        np.testing.assert_allclose(r["per_seed"][i]["vs_dense"]["linear_cka"]["dense_1"][1],
                                   similarity.linear_cka(reps[1]["dense_1"], reps[0]["dense_1"]), atol=1e-5)
        assert r["per_seed"][i]["levels"][1]["test_accuracy"] == records[1]["replicas"][i]["test_accuracy"]
        one = exp.run({"imp_workdir": str(d), "num_inputs": 48, "metrics": metrics, "seeds": [str(seed)]},
                      tmp_path / f"seed{seed}")
        assert one["seeds"] == [seed] and "per_seed" not in one and one["vs_dense"] == r["per_seed"][i]["vs_dense"]
    assert r["per_seed"][0]["vs_dense"] != r["per_seed"][1]["vs_dense"]  # two networks, not one read twice
    for m in metrics:
        for n in r["layers"]:
            s = conventions.summary([p["vs_dense"][m][n][1] for p in r["per_seed"]])
            assert r["vs_dense"][m][n][1] == pytest.approx(s["mean"])
            assert r["vs_dense_std"][m][n][1] == pytest.approx(s["std"])
        np.testing.assert_allclose(r["matrix"][m], np.mean([p["matrix"][m] for p in r["per_seed"]], axis=0))
    assert r["levels"][1]["test_accuracy"] == pytest.approx(records[1]["test_accuracy"])
    assert r["levels"][1]["num_seeds"] == 2
    with pytest.raises(ValueError, match=r"seeds=3,7: seed\(s\) \[7\] not trained in imp_workdir=.*\[3, 4\]"):
        exp.run({"imp_workdir": str(d), "metrics": metrics, "seeds": ["3", "7"]}, tmp_path / "bad")
    # seed 3 diverged at level 1: that level is summarised over seed 4 alone, and seed 3's skip is reported
    def load(workdir):
        built, variables, records = _LOAD_LEVELS(workdir)
        variables[1] = jax.tree_util.tree_map(lambda a: a.at[0].set(np.nan), variables[1])
        return built, variables, records

    monkeypatch.setattr(exp.imp_exp, "load_levels", load)
    r2 = exp.run({"imp_workdir": str(d), "num_inputs": 48, "metrics": metrics}, tmp_path / "diverged")
    assert [(sk["seed"], sk["level"]) for sk in r2["skipped_levels"]] == [(3, 1)]
    assert [lv["num_seeds"] for lv in r2["levels"]] == [2, 1]
    assert r2["vs_dense"]["svcca"]["dense_0"][1] == r["per_seed"][1]["vs_dense"]["svcca"]["dense_0"][1]
    assert r2["vs_dense_std"]["svcca"]["dense_0"][1] == 0.0



def _poisoned(level: int):
    """``load_levels`` with every parameter of one level set to NaN (a diverged run)."""
    def load(workdir):
        built, variables, records = _LOAD_LEVELS(workdir)
        variables[level] = jax.tree_util.tree_map(lambda a: a * np.nan, variables[level])
        return built, variables, records
    return load


def test_diverged_level_is_skipped_and_reported_not_fatal(imp_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(exp.imp_exp, "load_levels", _poisoned(1))
    r = exp.run({"imp_workdir": str(imp_dir), "num_inputs": 32, "metrics": ["linear_cka"]}, tmp_path)
    assert [lv["level"] for lv in r["levels"]] == [0]
    assert [sk["level"] for sk in r["skipped_levels"]] == [1]
    assert "non-finite activations in layer(s) ['dense_0', 'dense_1', 'logits']" in r["skipped_levels"][0]["reason"]
    assert np.asarray(r["matrix"]["linear_cka"]).shape == (1, 3, 3)
    assert (tmp_path / "similarity.json").exists()
    monkeypatch.setattr(exp.imp_exp, "load_levels", _poisoned(0))
    with pytest.raises(ValueError, match=r"level 0 \(the dense network\) has non-finite activations"):
        exp.run({"imp_workdir": str(imp_dir), "num_inputs": 32, "metrics": ["linear_cka"]}, tmp_path)


def test_bad_config(imp_dir, tmp_path):
    with pytest.raises(ValueError, match="imp_workdir: required"):
        exp.run({}, tmp_path)
    with pytest.raises(ValueError, match="metrics="):
        exp.run({"imp_workdir": str(imp_dir), "metrics": ["cka"]}, tmp_path)
    with pytest.raises(ValueError, match="layers:"):
        exp.run({"imp_workdir": str(imp_dir), "layers": ["conv_0"], "num_inputs": 16}, tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        exp.run({"imp_workdir": str(tmp_path)}, tmp_path)


def test_study_centring_variant_matches_its_closed_form():
    """``K - m_j - m_j + m̄`` (m = row means of a symmetric K) is ``K_c + (m1ᵀ - 1mᵀ)``: the centred Gram plus an
    antisymmetric part. So ``tr(K̃ L̃) = ⟨K_c, L_c⟩ - 2n Σ (m - m̄)(l - l̄)`` and ``‖K̃‖² = ‖K_c‖² + 2n Σ (m - m̄)²``;
    with centred activations (m = 0) the variant is exactly linear CKA."""
    rng = np.random.default_rng(0)
    n = 40
    x = np.maximum(rng.normal(size=(n, 7)) + 1.5, 0.0)  # ReLU-like: a large common mean
    y = np.maximum(x @ rng.normal(size=(7, 5)) + rng.normal(size=(n, 5)), 0.0)
    prepare, compare = exp.STUDY_VARIANTS["cka_study_centring"]
    got = float(compare(prepare(x), prepare(y)))

    def parts(a):
        k = a @ a.T
        h = np.eye(n) - 1.0 / n
        m = k.mean(1)
        return h @ k @ h, m - m.mean()

    kc, dm = parts(x)
    lc, dl = parts(y)
    want = (np.sum(kc * lc) - 2 * n * dm @ dl) / np.sqrt((np.sum(kc**2) + 2 * n * dm @ dm)
                                                          * (np.sum(lc**2) + 2 * n * dl @ dl))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got < float(similarity.linear_cka(x, y)) - 0.05  # the bug lowers CKA of ReLU-like layers visibly
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(float(compare(prepare(xc), prepare(yc))), float(similarity.linear_cka(x, y)),
                               rtol=1e-4)


@pytest.mark.parametrize("c", [1e-6, 1e3, 1e6, 1e18])
def test_study_variants_are_scale_invariant_in_float32(c):
    """Cosines of Grams do not change when the activations are scaled; in float32 ``vdot(k, k)·vdot(l, l)``
    underflowed at c = 1e-6 and overflowed at 1e6 and 1e18 on these layers (issue 28). Float64 formulas."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(40, 7)) + 1.5, 0.0)
    y = np.maximum(x @ rng.normal(size=(7, 5)) + rng.normal(size=(40, 5)), 0.0)
    k, l = x @ x.T, y @ y.T
    cos = lambda a, b, bt: np.sum(a * (b.T if bt else b)) / np.sqrt(np.sum(a * a) * np.sum(b * b))
    study = lambda g: g - g.mean(0)[None, :] - g.mean(1)[None, :] + g.mean()
    want = {"cka_no_centring": cos(k, l, False), "cka_one_sided_centring": cos(k - k.mean(0), l - l.mean(0), False),
            "cka_study_centring": cos(study(k), study(l), True)}
    for name, (prepare, compare) in exp.STUDY_VARIANTS.items():
        got = compare(prepare((x * c).astype(np.float32)), prepare((y * c).astype(np.float32)))
        np.testing.assert_allclose(float(got), want[name], rtol=1e-4, err_msg=name)
