"""experiments.merge end to end on the embedded digits: outputs, invariants, reuse of trained networks."""
from __future__ import annotations

import csv

import pytest

import jax

from experiments import common
from experiments import imp as imp_experiment
from experiments import merge as merge_experiment
from jaxprune import checkpoint, merging, train

BASE = dict(dataset="digits", model="mlp", hidden=["32", "16"], normalize="none", optimizer="momentum", lr=0.05,
            weight_decay=0.0, schedule="constant", milestones=[], training_steps="3ep", batch_size=32,
            sparsity=["0.5", "0.75"], criteria=["l1", "l2"], seeds=["0"])


def _acc(results, seed, setting, crit, mode):
    s = next(s for s in results["seeds"] if s["seed"] == seed)
    return next(r["test_accuracy"] for r in s["runs"]
                if (r["setting"], r["criterion"], r["mode"]) == (setting, crit, mode))


@pytest.mark.slow
def test_run_writes_results_and_reuses_trained_networks(tmp_path):
    cfg = {**BASE, "seeds": ["0", "1"], "criteria": ["l2"]}
    res = merge_experiment.run(cfg, tmp_path)
    for name in ("results.json", "metrics.csv", "accuracy_vs_sparsity.png", "seed_0/trained.json",
                 "seed_1/trained.json"):
        assert (tmp_path / name).exists(), name
    on_disk = checkpoint.read_json(tmp_path / "results.json")
    assert on_disk["finished"] and on_disk["config"]["criteria"] == ["l2"]
    assert on_disk["config"]["workdir"] == str(tmp_path) and "jax" in on_disk["environment"]
    for s in res["seeds"]:
        assert len(s["runs"]) == 2 * 2  # settings × modes
        assert 0 <= s["original"]["test_accuracy"] <= 1
        for r in s["runs"]:
            assert 0 <= r["test_accuracy"] <= 1
            expected = {"0.5": {"dense_0": 16, "dense_1": 8}, "0.75": {"dense_0": 8, "dense_1": 4}}[r["setting"]]
            assert r["widths"] == expected
            assert sum(layer["kept"] for layer in r["layers"].values()) == sum(expected.values())
            if r["mode"] == "prune":
                assert all(layer["merged"] == 0 for layer in r["layers"].values())
    # mean over seeds in the summary
    cell = res["summary"]["l2"]["0.5"]
    mean = (_acc(res, 0, "0.5", "l2", "merge") + _acc(res, 1, "0.5", "l2", "merge")) / 2
    assert cell["merge"]["mean"] == pytest.approx(mean)
    assert cell["gain"]["mean"] == pytest.approx(cell["merge"]["mean"] - cell["prune"]["mean"])
    with open(tmp_path / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    # A re-run reloads the trained networks instead of training again.
    trained = checkpoint.read_json(tmp_path / "seed_0" / "trained.json")
    again = merge_experiment.run(cfg, tmp_path)
    assert checkpoint.read_json(tmp_path / "seed_0" / "trained.json") == trained
    assert again["seeds"][0]["original"] == res["seeds"][0]["original"]


def test_threshold_above_one_merges_nothing(tmp_path):
    res = merge_experiment.run({**BASE, "threshold": 1.5, "training_steps": "1ep"}, tmp_path)
    for cells in res["summary"].values():
        for cell in cells.values():
            assert cell["gain"]["mean"] == 0.0


def test_loads_level_0_of_an_imp_workdir(tmp_path):
    imp_cfg = dict(dataset="digits", model="mlp", hidden=["32", "16"], training_steps="2ep", batch_size=32,
                   levels=0)
    imp_res = imp_experiment.train_and_evaluate(imp_cfg, tmp_path / "imp")
    res = merge_experiment.run({**BASE, "source_workdir": str(tmp_path / "imp"), "sparsity": ["0.5"]},
                               tmp_path / "merge")
    assert not (tmp_path / "merge" / "seed_0").exists()  # nothing trained
    assert res["seeds"][0]["original"]["test_accuracy"] == pytest.approx(imp_res["levels"][0]["test_accuracy"])


@pytest.mark.slow
def test_each_seed_reads_its_own_network_of_a_several_seed_imp_workdir(tmp_path):
    imp_cfg = dict(dataset="digits", model="mlp", hidden=["32", "16"], training_steps="2ep", batch_size=32,
                   levels=0, seeds=["1:3"])
    imp_res = imp_experiment.train_and_evaluate(imp_cfg, tmp_path / "imp")
    cfg = {**BASE, "source_workdir": str(tmp_path / "imp"), "sparsity": ["0.5"], "criteria": ["l2"]}
    res = merge_experiment.run({**cfg, "seeds": ["2", "1"]}, tmp_path / "merge")
    by_seed = dict(zip([1, 2], imp_res["levels"][0]["replicas"]))  # replicas in the order of the run's seeds
    for s in res["seeds"]:  # seed 2 first: the replica is found by seed, not by position
        assert s["original"]["test_accuracy"] == pytest.approx(by_seed[s["seed"]]["test_accuracy"])
        assert s["trained"]["seed"] == s["seed"]
    assert res["seeds"][0]["original"] != res["seeds"][1]["original"]
    with pytest.raises(ValueError, match=r"source_workdir: .* experiments.imp run of seeds \[1, 2\], which trained "
                                         r"no network for seed 0"):
        merge_experiment.run({**cfg, "seeds": ["1", "0"]}, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before any work


@pytest.mark.slow
def test_vgg_with_batchnorm_to_a_pruned_cfg(tmp_path):
    cfg = {**BASE, "model": "vgg", "hidden": merge_experiment.DEFAULTS["hidden"], "vgg_cfg": ["4", "M", "6"],
           "pruned_cfg": ["2", "M", "3"], "sparsity": [],
           "training_steps": "1ep", "criteria": ["l2_gm"], "max_train_examples": 256, "batch_size": 64,
           "max_test_examples": 100}
    res = merge_experiment.run(cfg, tmp_path)
    runs = res["seeds"][0]["runs"]
    assert [r["setting"] for r in runs] == ["cfg", "cfg"]
    assert runs[0]["widths"] == {"conv_0": 2, "conv_1": 3}
    assert "test_accuracy_stale_bn" not in runs[0]
    # With BatchNorm re-estimation: the data-free accuracy is kept beside the re-estimated one, and the statistics
    # are those of train.recalibrate_batchnorm on the same batches.
    again = merge_experiment.run({**cfg, "seeds": ["0"], "bn_recalibration_batches": 2}, tmp_path)
    for r0, r1 in zip(runs, again["seeds"][0]["runs"]):
        assert r1["test_accuracy_stale_bn"] == r0["test_accuracy"]
    model, variables, x_train, x_test, y_test, _ = merge_experiment._load_source(
        merge_experiment._config(cfg), str(tmp_path / "seed_0"))
    m = merging.merge(model, variables, widths={"conv_0": 2, "conv_1": 3}, mode="merge", criterion="l2_gm",
                      threshold=0.1, key=jax.random.PRNGKey(0))
    fresh = train.recalibrate_batchnorm(m.model, m.variables, x_train, batch_size=64, num_batches=2)
    assert again["seeds"][0]["runs"][0]["test_accuracy"] == pytest.approx(  # runs[0]: merge (merging.MODES[0])
        common.accuracy(m.model, fresh, x_test, y_test))
    assert runs[0]["num_params"] < res["seeds"][0]["original"]["num_params"]


@pytest.mark.parametrize("config, match", [
    ({"colour": 1}, "unknown keys"),
    ({"criteria": ["l3"]}, "criteria"),
    ({"model": "vgg", "vgg_cfg": []}, "vgg_cfg"),
    ({"sparsity": [], "pruned_cfg": []}, "sparsity"),
])
def test_bad_config(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        merge_experiment.run({**BASE, **config}, tmp_path)


def test_the_typed_config_is_the_flag_table():
    """MergeSettings gives the flags of the tuple SPEC it replaced: the shared training rows unchanged, then
    merging's own in their order; a typed config and its dict give the same checked config."""
    from experiments import settings

    cls = merge_experiment.MergeSettings
    assert settings.to_dict(cls()) == merge_experiment.DEFAULTS == common.defaults(merge_experiment.SPEC)
    n = len(common.TRAIN_SPEC)
    assert merge_experiment.SPEC[:n] == [r[:3] + tuple(tuple(c) for c in r[3:]) for r in common.TRAIN_SPEC]
    assert [r[:2] for r in merge_experiment.SPEC[n:]] == [
        ("seeds", ["0", "1", "2"]), ("source_workdir", ""), ("sparsity", ["0.5", "0.6", "0.7", "0.8"]),
        ("pruned_cfg", []), ("layers", []), ("criteria", ["l1", "l2", "l2_gm"]), ("threshold", None),
        ("lam", merging.LAMBDA), ("bn_scale", "exact"), ("scale", "norm"), ("bn_recalibration_batches", 0),
        ("workdir", "runs/merge")]
    typed = merge_experiment._config(settings.as_config(cls(seeds=("2", "1"), sparsity=("0.5",), threshold=0.3)))
    assert typed == merge_experiment._config({"seeds": ["2", "1"], "sparsity": ["0.5"], "threshold": 0.3})
    assert typed["seeds"] == [2, 1] and typed["sparsity"] == ["0.5"]
