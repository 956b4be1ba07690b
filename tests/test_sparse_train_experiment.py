"""experiments.sparse_train end to end on digits (few steps): the results.json schema, exact densities, mean/std
over seeds, a rerun reusing finished runs, and the config refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import sparse_train
from jaxprune import checkpoint

BASE = dict(dataset="digits", model="mlp", hidden=["24", "16"], normalize="unit", optimizer="sgd", lr=0.1,
            weight_decay=0.0, schedule="constant", training_steps="40", batch_size=32, sparsity=["0.9"],
            prune_begin="0", prune_end="20", prune_frequency="10", update_interval="10", update_end="30",
            seeds=["0", "1"])


@pytest.mark.slow
def test_end_to_end_schema_densities_and_rerun(tmp_path):
    res = sparse_train.train_and_evaluate({**BASE, "methods": ["gradual", "rigl"]}, tmp_path)
    assert set(res["dense"]) >= {"test_accuracy", "test_accuracy_std", "num_seeds"} and res["dense"]["num_seeds"] == 2
    assert set(res["methods"]) == {"gradual", "rigl"} and set(res["methods"]["rigl"]) == {"0.9"}
    # prunable: the two hidden kernels (64·24, 24·16); the output layer stays dense
    sizes = (64 * 24, 24 * 16)
    for method, by_s in res["methods"].items():
        for s, rec in by_s.items():
            if method == "gradual":  # uniform: ceil(s · n) per layer
                kept = sum(n - math.ceil(float(s) * n - 1e-9) for n in sizes)
                assert rec["density"] == kept / sum(sizes)
            else:  # ERK: 1 − s up to one weight per layer
                assert abs(rec["density"] - (1 - float(s))) <= 2 / sum(sizes)
            acc = [v["test_accuracy"] for v in rec["per_seed"].values()]
            assert rec["test_accuracy"] == pytest.approx(np.mean(acc))
            assert rec["test_accuracy_std"] == pytest.approx(np.std(acc, ddof=1))
            assert 0 <= rec["test_accuracy"] <= 1 and rec["num_seeds"] == 2 and rec["conforms"]
    assert res["dense"]["test_accuracy"] > 0.5  # it learned (10 classes)
    assert (tmp_path / "accuracy_vs_density.png").stat().st_size > 1000
    run = tmp_path / "rigl" / "0.9" / "seed_1" / "run.json"
    stamp = run.stat().st_mtime_ns
    again = sparse_train.train_and_evaluate({**BASE, "methods": ["rigl"], "sparsity": ["0.9"]}, tmp_path)
    assert run.stat().st_mtime_ns == stamp  # reused, not retrained
    assert again["methods"]["rigl"]["0.9"] == res["methods"]["rigl"]["0.9"]
    assert checkpoint.read_json(tmp_path / "results.json")["methods"].keys() == {"rigl"}
    # a finished run's record carries its checksum: a changed number is refused, not reported
    doc = json.loads(run.read_text())
    run.write_text(json.dumps({**doc, "test_accuracy": doc["test_accuracy"] + 0.01}))
    with pytest.raises(checkpoint.RecordError, match="run.json"):
        sparse_train.train_and_evaluate({**BASE, "methods": ["rigl"], "sparsity": ["0.9"]}, tmp_path)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="sparsity=\\[0.9\\]: --pattern=n:m with --nm=2:4 expects"):
        sparse_train.train_and_evaluate({**BASE, "methods": ["gradual"], "pattern": "n:m"}, tmp_path)
    with pytest.raises(ValueError, match="pattern='n:m': rigl/set/static train unstructured masks"):
        sparse_train.train_and_evaluate({**BASE, "methods": ["rigl"], "pattern": "n:m", "sparsity": ["0.5"]},
                                        tmp_path)
    with pytest.raises(ValueError, match="methods=\\['snip'\\]"):
        sparse_train.train_and_evaluate({**BASE, "methods": ["snip"]}, tmp_path)
    with pytest.raises(ValueError, match="update_end='80'"):
        sparse_train.train_and_evaluate({**BASE, "methods": ["set"], "update_end": "80"}, tmp_path)
    with pytest.raises(ValueError, match="dense_0/kernel: m=3: the axis length 64"):
        sparse_train.train_and_evaluate({**BASE, "methods": ["gradual"], "pattern": "n:m", "nm": "2:3",
                                         "sparsity": [str(1 / 3)]}, tmp_path)
    assert not (tmp_path / "config.json").exists()  # refused before any work


@pytest.mark.slow
def test_longer_sparse_runs_and_held_out_validation(tmp_path):
    """--sparse_steps_multiplier=2: the sparse run trains 2 × 40 steps with its schedule stretched (update_end 30 →
    60), keyed rigl_2x; the dense network trains 40. --validation_examples=337: every network trains on the first
    1100 digits and is evaluated on the last 337 (val_accuracy, a multiple of 1/337)."""
    cfg = sparse_train.Config.parse({**sparse_train.DEFAULTS, **BASE, "sparse_steps_multiplier": 2.0})
    rigl = sparse_train.method_config(cfg, "rigl", 0.9, 45, 80)
    gradual = sparse_train.method_config(cfg, "gradual", 0.9, 45, 80)
    assert (rigl.end_step, rigl.interval) == (60, 10)
    assert (gradual.begin_step, gradual.end_step, gradual.frequency) == (0, 40, 10)
    res = sparse_train.train_and_evaluate({**BASE, "methods": ["rigl"], "seeds": ["0"], "sparse_steps_multiplier": 2,
                                           "validation_examples": 337}, tmp_path)
    assert res["metric"] == "val_accuracy" and res["sparse_steps_multiplier"] == 2
    rec = res["methods"]["rigl_2x"]["0.9"]
    assert set(res["methods"]) == {"rigl_2x"} and rec["steps"] == 80
    for acc in (rec["val_accuracy"], res["dense"]["val_accuracy"]):
        assert abs(acc * 337 - round(acc * 337)) < 1e-6 and 0.3 < acc <= 1
    dense = checkpoint.read_json(tmp_path / "dense" / "seed_0" / "trained.json")
    assert dense["steps"] == 40 and dense["settings"]["max_train_examples"] == 1100
    run = checkpoint.read_json(tmp_path / "rigl_2x" / "0.9" / "seed_0" / "run.json")
    assert run["steps"] == 80 and run["settings"]["sparse_steps_multiplier"] == 2.0
    assert "val_accuracy, dense" in sparse_train.format_table(res)


@pytest.mark.parametrize("key, value, match", [
    ("sparse_steps_multiplier", 0.5, "sparse_steps_multiplier=0.5: expected a number in \\[1, 100\\]"),
    ("validation_examples", -1, "validation_examples=-1: expected an integer >= 0"),
    ("validation_examples", 1437, "validation_examples=1437: expected fewer than the 1437 training examples")])
def test_multiplier_and_validation_refused(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        sparse_train.train_and_evaluate({**BASE, "methods": ["rigl"], key: value}, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_workdir_from_before_the_multiplier_and_validation_flags_is_reused(tmp_path):
    """config.json and run.json written before --sparse_steps_multiplier / --validation_examples existed (keys
    absent) are reused as made with their defaults (1, 0), not refused."""
    cfg = {**BASE, "methods": ["static"], "seeds": ["0"]}
    sparse_train.train_and_evaluate(cfg, tmp_path)
    old = ("sparse_steps_multiplier", "validation_examples")
    config = checkpoint.read_record(tmp_path / "config.json")
    checkpoint.write_record(tmp_path / "config.json", {k: v for k, v in config.items() if k not in old})
    run = checkpoint.read_json(tmp_path / "static/0.9/seed_0/run.json")
    run["settings"] = {k: v for k, v in run["settings"].items() if k not in old}
    run.pop(checkpoint.RECORD_SHA)  # as those versions wrote it: without a record checksum
    checkpoint.write_json(tmp_path / "static/0.9/seed_0/run.json", run)
    stamp = (tmp_path / "static/0.9/seed_0/run.json").stat().st_mtime_ns
    sparse_train.train_and_evaluate(cfg, tmp_path)
    assert (tmp_path / "static/0.9/seed_0/run.json").stat().st_mtime_ns == stamp


def test_the_typed_config_is_the_flag_table():
    """SparseTrainSettings gives the flags of the tuple SPEC it replaced: the shared training rows unchanged, then
    sparse training's own in their order; a typed config and its dict parse to the same Config."""
    import dataclasses

    from experiments import common, settings

    cls = sparse_train.SparseTrainSettings
    assert settings.to_dict(cls()) == sparse_train.DEFAULTS == common.defaults(sparse_train.SPEC)
    n = len(common.TRAIN_SPEC)
    assert sparse_train.SPEC[:n] == [r[:3] + tuple(tuple(c) for c in r[3:]) for r in common.TRAIN_SPEC]
    assert [r[:2] for r in sparse_train.SPEC[n:]] == [
        ("prune_output", False), ("exclude", []), ("methods", ["gradual", "rigl", "set", "static"]),
        ("sparsity", ["0.9", "0.95", "0.98"]), ("pattern", "unstructured"), ("nm", "2:4"), ("block", []),
        ("gradual_distribution", "uniform"), ("dst_distribution", "erk"), ("prune_begin", "1ep"),
        ("prune_end", "10ep"), ("prune_frequency", "100"), ("update_interval", "100"), ("update_end", "12ep"),
        ("drop_fraction", 0.3), ("sparse_steps_multiplier", 1.0), ("validation_examples", 0), ("seeds", ["0"]),
        ("imp_results", ""), ("workdir", "runs/sparse_train")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().workdir = "elsewhere"
    typed = settings.as_config(cls(methods=("rigl",), sparsity=("0.8",), seeds=("2", "1")))
    assert typed == {**sparse_train.DEFAULTS, "methods": ["rigl"], "sparsity": ["0.8"], "seeds": ["2", "1"]}
    cfg = sparse_train.Config.parse(typed)
    assert (cfg.methods, cfg.sparsities, cfg.seeds) == (("rigl",), (0.8,), (2, 1))
