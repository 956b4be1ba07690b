"""The toy pruning experiment end to end on a tiny configuration."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import common, lrp_toy, lrp_toy_run, settings
from jaxprune import checkpoint, criteria, data, lrp, models, train

# The training recipe is explicit (the configs' Adam 1e-3): the bare training defaults are common.TrainSettings'.
TINY = {"datasets": ["moons", "spiral"], "num_train": 256, "hidden": ["24", "24", "24"], "optimizer": "adam",
        "lr": 1e-3, "training_steps": "4ep", "batch_size": 32, "samples_per_class": ["1", "3"], "seeds": ["0:3"],
        "n_prune": 30, "plot_n": 3}


@pytest.mark.parametrize("bug", [False, True])
def test_pruned_networks_are_evaluated_by_their_own_apply(bug):
    """``prune`` gives a smaller model whose own ``apply`` (what the accuracies and decision boundaries use) computes
    the full network with the removed units' outgoing weights zeroed (recomputed in numpy), with or without the
    reference net's missing last ReLU."""
    model = lrp_toy.build_model({**lrp_toy.DEFAULTS, "hidden": ["5", "6", "7"], "reference_bug": bug}, 3)
    assert model.no_relu_after == ((2,) if bug else ())
    v = models.init(model, jax.random.PRNGKey(0), (1, 2))
    rng = np.random.RandomState(0)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    y = rng.randint(0, 3, size=40)
    np.testing.assert_allclose(lrp_toy.logits(model, v, x), model.apply(v, x), rtol=1e-6, atol=1e-6)
    hidden = ["dense_0", "dense_1", "dense_2"]
    scores = {l: rng.permutation(n).astype(np.float32) for l, n in zip(hidden, (5, 6, 7))}
    small, small_vars, keep = lrp_toy.prune(model, v, scores, 6)
    assert list(keep) == hidden
    removed = {l: np.setdiff1d(np.arange(n), np.asarray(keep[l])) for l, n in zip(hidden, (5, 6, 7))}
    assert sum(r.size for r in removed.values()) == 6
    gone = np.concatenate([scores[l][removed[l]] for l in hidden])
    kept = np.concatenate([scores[l][np.asarray(keep[l])] for l in hidden])
    assert gone.max() < kept.min()  # the 6 globally lowest scores (the 0s and 1s of the three layers) went
    assert small.features == tuple(len(keep[l]) for l in hidden) + (3,) and small.no_relu_after == model.no_relu_after
    p = jax.tree_util.tree_map(np.array, v["params"])
    for i, l in enumerate(hidden):
        p[f"dense_{i + 1}"]["kernel"][removed[l]] = 0.0
    want = np.asarray(model.apply({"params": p}, x))
    got = lrp_toy.logits(small, small_vars, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert lrp_toy.accuracy(small, small_vars, x, y) == float(np.mean(np.argmax(want, -1) == y))
    xx, yy, grid = lrp_toy._grid(x, steps=7)
    np.testing.assert_array_equal(lrp_toy._predict_grid(small, small_vars, grid, xx.shape),
                                  np.argmax(np.asarray(model.apply({"params": p}, grid)), -1).reshape(7, 7))


def test_reference_samples_are_balanced_and_seeded():
    a = lrp_toy.reference_samples("spiral", 5, 4, seed=0)
    assert np.bincount(a.labels).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(a.images, lrp_toy.reference_samples("spiral", 5, 4, seed=0).images)
    assert not np.array_equal(a.images, lrp_toy.reference_samples("spiral", 5, 4, seed=1).images)


@pytest.mark.slow
def test_tiny_run_writes_complete_results(tmp_path, monkeypatch):
    calls = []  # every prune: (kept indices, pruned variables), in the order dataset, n, seed, criterion
    real_prune = lrp_toy.prune

    def spy(model, variables, scores, n_prune):
        out = real_prune(model, variables, scores, n_prune)
        calls.append((out[2], out[1]))
        return out

    monkeypatch.setattr(lrp_toy_run, "prune", spy)  # run_dataset looks it up there
    res = lrp_toy.run(TINY, tmp_path)
    on_disk = checkpoint.read_json(tmp_path / "results.json")
    assert on_disk["config"]["n_prune"] == 30 and "environment" in on_disk
    for name in ("moons", "spiral"):
        d = res["datasets"][name]
        assert d["hidden_units"] == 72 and d["num_classes"] == (2 if name == "moons" else 4)
        assert 0 <= d["before"]["train_accuracy"] <= 1 and 0 <= d["before"]["noisy_test_accuracy"] <= 1
        assert set(d["criteria"]) == {"weight", "grad", "taylor", "lrp"}
        for crit, per_n in d["criteria"].items():
            assert set(per_n) == {"1", "3"}
            for e in per_n.values():
                assert len(e["train_accuracy"]["values"]) == 3
                assert all(0 <= a <= 1 for a in e["train_accuracy"]["values"] + e["noisy_test_accuracy"]["values"])
                assert 0 <= e["overlap"]["mean"] <= 1
                assert sum(e["pruned_per_layer"].values()) == pytest.approx(30)
        assert d["criteria"]["weight"]["1"]["overlap"]["mean"] == 1.0  # data-free: identical for every seed
        for png in (f"{name}_train_accuracy_vs_n.png", f"{name}_noisy_test_accuracy_vs_n.png",
                    f"{name}_boundaries.png"):
            assert (tmp_path / png).stat().st_size > 0
    assert len(calls) == 2 * 2 * 3 * 4
    _check_lowest_units_were_removed(tmp_path, res, calls[:4])  # moons, n = 1, seed 0, every criterion
    rows = lrp_toy.summary(res, 3)
    assert len(rows) == 8 and {r["criterion"] for r in rows} == {"weight", "grad", "taylor", "lrp"}


def _check_lowest_units_were_removed(tmp_path, res, calls):
    """Rescore the saved moons net on seed 0's reference samples: the removed units are the 30 globally lowest
    scores (``criteria.global_keep``; every removed score <= every kept one), and the recorded accuracy is that of
    the full net with those units' outgoing weights zeroed (an exact stand-in for removing them)."""
    c = {**lrp_toy.DEFAULTS, **TINY}
    model = lrp_toy.build_model(c, 2)
    v = checkpoint.restore(tmp_path / "moons" / "model", models.init(model, jax.random.PRNGKey(0), (1, 2)))
    ref = lrp_toy.reference_samples("moons", 1, 2, seed=0)
    tr = data.load("moons", "train", seed=0, num_examples=256)
    hidden = ["dense_0", "dense_1", "dense_2"]
    for crit, (keep, small_vars) in zip(c["criteria"], calls):
        sc = criteria.scores(crit, model, v, ref.images, ref.labels, composite=c["composite"])
        want = criteria.global_keep({l: sc[l] for l in hidden}, 30)
        assert list(keep) == hidden
        for l in hidden:
            np.testing.assert_array_equal(np.asarray(keep[l]), np.asarray(want[l]), err_msg=f"{crit} {l}")
        flat = np.concatenate([np.asarray(sc[l], np.float64) for l in hidden])
        kept = np.concatenate([np.isin(np.arange(24), np.asarray(keep[l])) for l in hidden])
        assert (~kept).sum() == 30 and flat[~kept].max() <= flat[kept].min(), crit
        p = jax.tree_util.tree_map(np.array, v["params"])
        for i, l in enumerate(hidden):
            p[f"dense_{i + 1}"]["kernel"][~kept[24 * i:24 * (i + 1)]] = 0.0
        acc = float(np.mean(np.argmax(np.asarray(model.apply({"params": p}, tr.images)), -1) == tr.labels))
        got = res["datasets"]["moons"]["criteria"][crit]["1"]["train_accuracy"]["values"][0]
        assert got == pytest.approx(acc, abs=1.01 / 256), crit  # at most one near-tie point may flip
        assert all(np.asarray(small_vars["params"][l]["kernel"]).shape[1] == len(keep[l]) for l in hidden)


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="datasets"):
        lrp_toy.run({**TINY, "datasets": ["mnist"]}, tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        lrp_toy.run({**TINY, "epochs": 3}, tmp_path)
    for bad, match in ((["1", "x"], "samples_per_class='1,x': expected comma-separated integers"),
                       (["2", "0"], "samples_per_class=2,0: expected positive integers")):
        with pytest.raises(ValueError, match=match):  # refused before any training
            lrp_toy.run({**TINY, "samples_per_class": bad}, tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_the_flags_are_the_typed_config_with_the_old_names_and_the_shared_training_defaults(tmp_path):
    """``LrpToySettings`` is the flag table: the names and order of the tuple SPEC it replaced (frozen here), its
    training flags the rows of ``common.TrainSettings`` (issue 30: one default per flag; the toy recipe is in the
    configs), the shared rows' choices, and a typed config is refused or run exactly as its dict."""
    old = {"datasets": ["moons", "circles", "spiral"], "num_train": 0, "model": "mlp", "model_kwargs": "",
           "hidden": ["300", "100"], "dropout": 0.5, "weight_init": "he_normal", "reference_bug": False,
           "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "training_steps": "16ep", "batch_size": 128,
           "model_seed": 0, "criteria": ["weight", "grad", "taylor", "lrp"], "composite": "zplus",
           "samples_per_class": ["1", "2", "5", "10", "20", "50", "100", "200"], "seeds": ["0:10"], "n_prune": 1000,
           "noise": 0.3, "plot_n": 5, "workdir": "runs/lrp_toy"}
    typed = settings.to_dict(lrp_toy.LrpToySettings())
    assert list(lrp_toy.DEFAULTS.items()) == list(old.items()) == list(typed.items())
    shared = {"hidden", "optimizer", "lr", "momentum", "training_steps", "batch_size"}
    assert [row for row in lrp_toy.SPEC if row[0] in shared] == [row for row in common.TRAIN_SPEC if row[0] in shared]
    choices = {row[0]: row[3] for row in lrp_toy.SPEC if len(row) > 3}
    assert choices == {"weight_init": common.WEIGHT_INIT[3], "optimizer": train.OPTIMIZERS,
                       "composite": tuple(lrp.composites.PRESETS)}
    with pytest.raises(ValueError, match=r"^noise=-1.0: expected a finite number in \[0, inf\)"):
        lrp_toy.run(lrp_toy.LrpToySettings(datasets=("moons",), noise=-1.0), tmp_path / "typed")
    assert not (tmp_path / "typed" / "moons").exists()
