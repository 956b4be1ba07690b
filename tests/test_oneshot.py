"""experiments.oneshot: exact weight/unit counts, the output layer untouched, end to end on digits."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from experiments import common, oneshot, oneshot_run
from jaxprune import checkpoint, models

MODEL = models.MLP((20, 12, 10), use_bias=False)
# The recipe is explicit (oneshot_mnist.cfg's, smaller): the bare training defaults are common.TrainSettings'.
BASE = dict(dataset="digits", model="mlp", hidden=["24", "12"], use_bias=False, normalize="unit", optimizer="adam",
            lr=0.001, training_steps="10ep", batch_size=50, scope="layerwise", sparsity=["0", "0.5", "0.9"],
            seeds=["0"])


def _vars(seed=0):
    return models.init(MODEL, jax.random.PRNGKey(seed), (1, 16))


@pytest.mark.parametrize("k", [0.0, 0.25, 0.5, 0.9])
def test_weight_pruning_zeroes_exactly_ceil_k_n_smallest_per_hidden_layer(k):
    params = _vars()["params"]
    pruned = oneshot.weight_pruned(params, MODEL.output_layer, k, "layerwise")
    for name in ("dense_0", "dense_1"):
        w, p = np.asarray(params[name]["kernel"]), np.asarray(pruned[name]["kernel"])
        zeros = p == 0
        assert zeros.sum() == math.ceil(k * w.size - 1e-9)
        if zeros.any() and (~zeros).any():  # every zeroed |w| is <= every kept |w|
            assert np.abs(w[zeros]).max() <= np.abs(w[~zeros]).min()
    np.testing.assert_array_equal(pruned["dense_2"]["kernel"], params["dense_2"]["kernel"])


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_unit_pruning_zeroes_whole_columns_with_smallest_l2_norm(scope):
    v = _vars(1)
    out = oneshot.unit_pruned(MODEL, v, 0.5, scope, "l2")
    zero_cols = {n: np.flatnonzero(np.all(np.asarray(out["params"][n]["kernel"]) == 0, axis=0))
                 for n in ("dense_0", "dense_1")}
    norms = {n: np.linalg.norm(np.asarray(v["params"][n]["kernel"]), axis=0) for n in zero_cols}
    if scope == "layerwise":
        assert len(zero_cols["dense_0"]) == 10 and len(zero_cols["dense_1"]) == 6
        for n, cols in zero_cols.items():
            assert set(cols) == set(np.argsort(norms[n], kind="stable")[:len(cols)])
    else:  # the 16 smallest norms over both layers together
        allnorms = np.concatenate([norms["dense_0"], norms["dense_1"]])
        assert len(zero_cols["dense_0"]) + len(zero_cols["dense_1"]) == 16
        cut = np.sort(allnorms)[15]
        assert all(norms[n][c] <= cut for n, cols in zero_cols.items() for c in cols)
    # the output layer keeps its columns; only its input rows of dense_1's masked units are zeroed (they send nothing)
    head, rows = np.asarray(v["params"]["dense_2"]["kernel"]).copy(), zero_cols["dense_1"]
    head[rows] = 0.0
    np.testing.assert_array_equal(out["params"]["dense_2"]["kernel"], head)
    np.testing.assert_array_equal(np.asarray(out["params"]["dense_1"]["kernel"])[zero_cols["dense_0"]], 0.0)


def _independent_accuracy(model, trained: dict, method: str, k: float, x, y) -> float:
    """Test accuracy of ``trained`` pruned in numpy: ``ceil(k·n)`` smallest |w| (weight) or smallest-L2 kernel
    columns (unit) of every hidden kernel zeroed, the output layer untouched."""
    p = jax.tree_util.tree_map(np.array, trained["params"])
    for name in ("dense_0", "dense_1"):
        w = p[name]["kernel"]
        if method == "weight":
            w.ravel()[np.argsort(np.abs(w).ravel(), kind="stable")[:math.ceil(k * w.size - 1e-9)]] = 0.0
        else:
            w[:, np.argsort(np.linalg.norm(w, axis=0), kind="stable")[:math.ceil(k * w.shape[1] - 1e-9)]] = 0.0
    return float(np.mean(np.argmax(np.asarray(model.apply({"params": p}, x)), -1) == y))


def test_run_on_digits_and_skip_finished_seeds(tmp_path, monkeypatch):
    seen = []  # the trained variables each pruning call starts from
    real_unit = oneshot.unit_pruned

    def spy(model, variables, *a, **kw):
        seen.append(variables)
        return real_unit(model, variables, *a, **kw)

    monkeypatch.setattr(oneshot_run, "unit_pruned", spy)  # its home: run_seed calls it there
    res = oneshot.run(BASE, tmp_path)
    dense = res["dense_accuracy"]["mean"]
    assert dense > 0.8 and res["dense_accuracy"]["std"] == 0.0
    assert len(seen) == 3  # one unit-pruning call per sparsity, all on the same trained network
    _, te = common.load_data("digits", "", "unit")
    model = models.build("mlp", 10, hidden=(24, 12), use_bias=False)
    for method in ("weight", "unit"):
        assert res["accuracy"][method]["0"] == pytest.approx(dense)  # k = 0 prunes nothing
        for k in (0.5, 0.9):  # what the pruned network scores, recomputed; one near-tie test point may flip
            want = _independent_accuracy(model, seen[0], method, k, te.images, te.labels)
            assert res["accuracy"][method][f"{k:g}"] == pytest.approx(want, abs=1.01 / len(te.labels)), (method, k)
        assert res["accuracy"][method]["0.9"] < dense - 0.1  # 90 % pruning without retraining costs accuracy
    assert (tmp_path / "accuracy_vs_sparsity.png").exists() and (tmp_path / "seed_0.json").exists()
    table = oneshot.format_table(res)
    assert "| 50 |" in table and f"{100 * dense:.2f}" in table
    before = checkpoint.read_json(tmp_path / "seed_0.json")
    again = oneshot.run(BASE, tmp_path)
    assert checkpoint.read_json(tmp_path / "seed_0.json") == before and again["accuracy"] == res["accuracy"]
    assert len(seen) == 3  # the finished seed was not retrained nor re-pruned
    # a seed record written before oneshot took every TrainSettings flag (issue 30) lacks them: it ran with their
    # ADDED_LATER values, so it is still reused ...
    old = checkpoint.read_record(tmp_path / "seed_0.json")
    added = {"vgg_cfg", "weight_decay", "schedule", "milestones", "gamma", "augment"}
    assert added <= set(old["settings"]) and added <= set(oneshot_run.ADDED_LATER)
    old["settings"] = {k: v for k, v in old["settings"].items() if k not in added}
    checkpoint.write_record(tmp_path / "seed_0.json", old, {"seed": 0})
    assert oneshot.run(BASE, tmp_path)["accuracy"] == res["accuracy"] and len(seen) == 3
    # ... unless the run asks for another value of one of them (then the seed is retrained)
    oneshot.run({**BASE, "weight_decay": 1e-4, "sparsity": ["0.5"]}, tmp_path)
    assert len(seen) == 4


def test_bad_sparsity_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sparsity"):
        oneshot.run({**BASE, "sparsity": ["1.2"]}, tmp_path)
