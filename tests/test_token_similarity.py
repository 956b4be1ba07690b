"""Token representations ``(n, tokens, d)`` in the per-level similarity analyses and ``experiments.similarity``:
``tokens="mean"`` (the default: the means over tokens) or ``"flatten"`` (n·tokens samples), on a tiny transformer
written here; conv maps keep their handling."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import analysis, checkpoint

MODULE = '''
import flax.linen as nn
import jax
import jax.numpy as jnp


class RowFormer(nn.Module):
    """The image's rows as tokens: (n, 8, 8, 1) -> (n, 8 tokens, 8) -> embed (6) + positions -> one single-head
    self-attention block (q, k, v, out) -> token MLP (10) -> mean over tokens -> classes."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        t = x.reshape(x.shape[0], x.shape[1], -1)
        h = nn.Dense(6, name="embed")(t) + self.param("pos", nn.initializers.normal(0.1), (t.shape[1], 6))
        q, k, v = (nn.Dense(6, name=n)(h) for n in ("q", "k", "v"))
        att = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / jnp.sqrt(6.0), axis=-1)
        h = h + nn.Dense(6, name="o")(jnp.einsum("nts,nsd->ntd", att, v))
        h = h + nn.Dense(6, name="mlp_out")(nn.relu(nn.Dense(10, name="mlp_in")(h)))
        return nn.Dense(self.num_classes, name="cls")(h.mean(axis=1))
'''


def _cka64(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) in float64: ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F)."""
    x = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
    y = np.asarray(y, np.float64) - np.asarray(y, np.float64).mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_token_samples_mean_and_flatten_and_other_shapes_pass_through():
    a = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 3))
    np.testing.assert_allclose(analysis.token_samples(a), np.asarray(a).mean(axis=1), rtol=1e-6)
    flat = np.asarray(analysis.token_samples(a, "flatten"))
    assert flat.shape == (20, 3) and np.array_equal(flat[4 * 2 + 1], np.asarray(a)[2, 1])
    conv = jnp.ones((2, 3, 3, 4))
    assert analysis.token_samples(conv, "flatten").shape == (2, 3, 3, 4)
    with pytest.raises(ValueError, match=r"tokens='first': expected one of \('mean', 'flatten'\)"):
        analysis.token_samples(a, "first")


def test_similarity_to_dense_on_token_representations_matches_float64_cka():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    dense = {"tok": jax.random.normal(k1, (12, 5, 4)), "conv": jax.random.normal(k3, (12, 3, 3, 2))}
    reps = {"tok": dense["tok"] + 0.7 * jax.random.normal(k2, (12, 5, 4)), "conv": dense["conv"] ** 2}
    mean = analysis.similarity_to_dense(reps, dense, ["linear_cka"])["linear_cka"]
    flat = analysis.similarity_to_dense(reps, dense, ["linear_cka"], tokens="flatten")["linear_cka"]
    r, d = np.asarray(reps["tok"]), np.asarray(dense["tok"])
    assert mean["tok"] == pytest.approx(_cka64(r.mean(1), d.mean(1)), abs=1e-5)
    assert flat["tok"] == pytest.approx(_cka64(r.reshape(-1, 4), d.reshape(-1, 4)), abs=1e-5)
    assert abs(mean["tok"] - flat["tok"]) > 1e-3  # the two options really differ
    conv = _cka64(np.asarray(reps["conv"]).reshape(12, -1), np.asarray(dense["conv"]).reshape(12, -1))
    assert mean["conv"] == flat["conv"] == pytest.approx(conv, abs=1e-5)  # conv maps: unchanged
    with pytest.raises(ValueError, match="tokens='all'"):
        analysis.similarity_to_dense(reps, dense, ["linear_cka"], tokens="all")


@pytest.fixture
def rowformer(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "tokmodels.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "tokmodels", raising=False)
    yield
    sys.modules.pop("tokmodels", None)


@pytest.mark.slow
def test_imp_analyses_and_the_similarity_experiment_take_a_transformers_token_representations(rowformer, tmp_path):
    from experiments import common
    from experiments import imp as imp_experiment
    from experiments import similarity as similarity_experiment

    cfg = {"dataset": "digits", "model": "tokmodels:RowFormer", "training_steps": "30", "batch_size": 64,
           "levels": 1, "prune_fraction": 0.5, "analyses": ["similarity"], "analysis_examples": 64,
           "analysis_metrics": "linear_cka"}
    imp_experiment.train_and_evaluate(cfg, tmp_path / "imp")
    built, variables, _ = imp_experiment.load_levels(tmp_path / "imp")
    x = np.asarray(built.task.x_test[:64])
    r0, r1 = (common.representations(built.task.model, v, x) for v in variables)
    assert np.shape(r0["mlp_in"]) == (64, 8, 10)  # a token layer
    want = _cka64(np.asarray(r1["mlp_in"]).mean(1), np.asarray(r0["mlp_in"]).mean(1))
    doc, = [checkpoint.read_json(f) for f in (tmp_path / "imp").rglob("analysis.json")]
    got = doc["levels"][1]["similarity"]["metrics"]["linear_cka"]["mlp_in"]
    assert got == pytest.approx(want, abs=1e-4)  # the per-level analysis: tokens="mean"
    for tokens in ("mean", "flatten"):
        sim = similarity_experiment.run({"imp_workdir": str(tmp_path / "imp"), "num_inputs": 64, "tokens": tokens,
                                         "metrics": ["linear_cka"], "layers": ["embed", "mlp_in", "cls"]},
                                        tmp_path / f"sim_{tokens}")
        a, b = np.asarray(r1["mlp_in"]), np.asarray(r0["mlp_in"])
        want = _cka64(a.mean(1), b.mean(1)) if tokens == "mean" else _cka64(a.reshape(-1, 10), b.reshape(-1, 10))
        assert sim["vs_dense"]["linear_cka"]["mlp_in"][1] == pytest.approx(want, abs=1e-4)
        m = np.asarray(sim["matrix"]["linear_cka"])  # (levels, layers, layers): embed vs mlp_in at level 1
        e1, m0 = np.asarray(r1["embed"]), b
        view = (lambda z: z.mean(1)) if tokens == "mean" else (lambda z: z.reshape(len(z), -1))
        assert m[1, 0, 1] == pytest.approx(_cka64(view(e1), view(m0)), abs=1e-4)
        assert sim["tokens"]["vs_dense"] == ("mean" if tokens == "mean" else "samples (n·tokens, d)")
