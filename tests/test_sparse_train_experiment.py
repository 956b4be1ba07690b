"""experiments.sparse_train end to end on digits (few steps): the results.json schema, exact densities, mean/std
over seeds, a rerun reusing finished runs, and the config refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import sparse_train
from jaxprune import checkpoint

BASE = dict(dataset="digits", model="mlp", hidden=["24", "16"], normalize="unit", optimizer="sgd", lr=0.1,
            weight_decay=0.0, schedule="constant", training_steps="40", batch_size=32, sparsity=["0.9"],
            prune_begin="0", prune_end="20", prune_frequency="10", update_interval="10", update_end="30",
            seeds=["0", "1"])


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
