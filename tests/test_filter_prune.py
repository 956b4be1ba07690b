"""experiments.filter_prune end to end on the embedded digits: exact round count, widths, counts, resume."""
from __future__ import annotations

import csv

import jax
import numpy as np
import pytest

from experiments import common, filter_prune
from jaxprune import checkpoint, criteria, models, structured, train

BASE = dict(dataset="digits", model="vgg", vgg_cfg=["6", "M", "10"], normalize="none", optimizer="momentum",
            lr=0.05, weight_decay=0.0, schedule="constant", milestones=[], training_steps="2ep", batch_size=64,
            finetune_steps="5", finetune_lr=0.01, prune_fraction=0.25, max_pruned_fraction=0.8, max_rounds=3)


def test_round_widths_closed_form():
    orig = {"a": 10, "b": 7}
    assert filter_prune.round_widths(orig, orig, 0.25, 0.9) == {"a": 7, "b": 5}  # ceil(2.5)=3, ceil(1.75)=2
    assert filter_prune.round_widths({"a": 2, "b": 1}, orig, 0.5, 0.9) == {"a": 1, "b": 1}  # floor ceil(0.1·n)
    assert filter_prune.round_widths({"a": 5, "b": 4}, orig, 0.5, 0.5) == {"a": 5, "b": 4}  # already at the floor


@pytest.mark.slow
def test_runs_exactly_max_rounds_and_records_counts(tmp_path):
    res = filter_prune.run(BASE, tmp_path)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and res["finished"]
    widths = [r["widths"] for r in rounds]
    assert widths[0] == {"conv_0": 6, "conv_1": 10}
    for prev, cur in zip(widths, widths[1:]):
        assert cur == filter_prune.round_widths(prev, widths[0], 0.25, 0.8)
    for r in rounds:  # parameter and FLOP counts follow from the widths alone
        a, b = r["widths"]["conv_0"], r["widths"]["conv_1"]
        params = 9 * a + 2 * a + 9 * a * b + 2 * b + (b * 10 + 10)  # conv, BN (γ, β), conv, BN, dense
        assert r["params"] == params
        assert r["flops"] == 2 * (64 * 9 * a + 16 * 9 * a * b + b * 10)  # 8×8 SAME conv, pool to 4×4, dense
        assert 0.0 <= r["accuracy_before_finetune"] <= 1.0 and 0.0 <= r["accuracy_after_finetune"] <= 1.0
    assert rounds[3]["pruned_filter_fraction"] == pytest.approx(1 - sum(widths[3].values()) / 16)
    with open(tmp_path / "rounds.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "accuracy_vs_params.png").exists()

    # A rerun with more rounds resumes: trained network and finished rounds are reloaded, one round is added.
    trained = checkpoint.read_json(tmp_path / "seed_0" / "trained" / "trained.json")
    more = filter_prune.run({**BASE, "max_rounds": 4}, tmp_path)
    assert checkpoint.read_json(tmp_path / "seed_0" / "trained" / "trained.json") == trained
    assert more["rounds"][:4] == checkpoint.read_json(tmp_path / "results.json")["rounds"][:4] == rounds
    assert more["rounds"][4]["widths"] == filter_prune.round_widths(widths[3], widths[0], 0.25, 0.8)


def _spy(monkeypatch):
    """Record every ``structured.remove_many`` keep and the variables every ``train.create_state`` starts from."""
    removed, started = [], []
    real_remove, real_create = structured.remove_many, train.create_state

    def remove_many(model, variables, keep, **kw):
        removed.append(keep)
        return real_remove(model, variables, keep, **kw)

    def create_state(variables, tx):
        started.append(variables)
        return real_create(variables, tx)

    monkeypatch.setattr(structured, "remove_many", remove_many)
    monkeypatch.setattr(train, "create_state", create_state)
    return removed, started, real_remove


def _trained(tmp_path, cfg):
    """The model, the saved round-0 variables and the data of a finished run in ``tmp_path``."""
    c = filter_prune._config(cfg)
    tr, te = common.load_data(c["dataset"], c["data_dir"], c["normalize"])
    model = common.build_model(c, tr.num_classes)
    x, y, xt, yt = train.to_device(tr.images, tr.labels, te.images, te.labels)
    v = checkpoint.restore(tmp_path / "seed_0" / "trained" / "checkpoint", models.init(model, jax.random.PRNGKey(0), x.shape))
    return c, model, v, (x, y, xt, yt)


def _assert_keep_equal(got, want):
    assert list(got) == list(want)
    for layer in want:
        np.testing.assert_array_equal(np.asarray(got[layer]), np.asarray(want[layer]), err_msg=layer)


def test_stops_at_the_floor_and_refuses_a_changed_config(tmp_path, monkeypatch):
    removed, _, _ = _spy(monkeypatch)
    cfg = {**BASE, "prune_fraction": 0.5, "max_pruned_fraction": 0.5, "max_rounds": 5, "criterion": "l2_gm"}
    res = filter_prune.run(cfg, tmp_path)
    assert [r["round"] for r in res["rounds"]] == [0, 1] and res["finished"]
    assert res["rounds"][1]["widths"] == {"conv_0": 3, "conv_1": 5}
    # The one removal kept, per layer, the filters farthest in total (L2) from the others, on the trained weights.
    _, model, v, _ = _trained(tmp_path, cfg)
    assert len(removed) == 1
    target = {"conv_0": 3, "conv_1": 5}
    _assert_keep_equal(removed[0], structured.select_layers(model, v, target, "l2_gm"))
    for layer, nk in target.items():
        k = np.asarray(v["params"][layer]["kernel"], np.float64)
        rows = k.reshape(-1, k.shape[-1]).T
        far = np.linalg.norm(rows[:, None] - rows[None], axis=-1).sum(1)
        np.testing.assert_array_equal(np.asarray(removed[0][layer]), np.sort(np.argsort(-far)[:nk]), err_msg=layer)
    with pytest.raises(ValueError, match="different config"):
        filter_prune.run({**BASE, "prune_fraction": 0.5, "max_pruned_fraction": 0.5, "criterion": "l1"}, tmp_path)


def test_data_driven_criterion_through_batchnorm_and_recalibration(tmp_path, monkeypatch):
    removed, started, real_remove = _spy(monkeypatch)
    cfg = {**BASE, "criterion": "taylor", "reference_examples": 32, "max_rounds": 1, "prune_fraction": 0.5,
           "training_steps": "1ep", "bn_recalibration_batches": 3}
    res = filter_prune.run(cfg, tmp_path)
    r = res["rounds"][1]
    assert r["widths"] == {"conv_0": 3, "conv_1": 5}
    # Recompute round 1 from the saved trained network: Taylor scores on the 32 reference examples pick the
    # kept filters (the highest scores), the removal is scored as is, then with re-estimated BatchNorm statistics.
    c, model, v, (x, y, xt, yt) = _trained(tmp_path, cfg)
    ref = np.random.default_rng(0).permutation(len(y))[:32]
    sc = criteria.scores("taylor", model, v, x[ref], y[ref], normalized=False)
    target = {"conv_0": 3, "conv_1": 5}
    want = structured.select_layers(model, v, target, {k: sc[k] for k in target})
    assert len(removed) == 1
    _assert_keep_equal(removed[0], want)
    for layer, nk in target.items():
        s_l, kept = np.asarray(sc[layer]), np.isin(np.arange(np.size(sc[layer])), np.asarray(want[layer]))
        assert kept.sum() == nk and s_l[kept].min() >= s_l[~kept].max(), layer
    small_model, small = real_remove(model, v, want)
    assert r["accuracy_after_removal"] == common.accuracy(small_model, small, xt, yt)
    key = jax.random.fold_in(jax.random.PRNGKey(0), 1)
    recal = train.recalibrate_batchnorm(small_model, small, x, batch_size=64, num_batches=3,
                                        key=jax.random.fold_in(key, 2))
    ft = started[-1]  # fine-tuning starts from the pruned, recalibrated network
    for a, b in zip(jax.tree_util.tree_leaves(ft), jax.tree_util.tree_leaves(recal)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(ft) == jax.tree_util.tree_structure(recal)
    # The statistics really changed, to the per-channel mean of BatchNorm's input over the 3 · 64 examples.
    assert not np.allclose(recal["batch_stats"]["bn_0"]["mean"], small["batch_stats"]["bn_0"]["mean"])
    k0 = np.asarray(small["params"]["conv_0"]["kernel"])  # (3, 3, 1, 3); SAME padding of the 8×8 digits
    xs = np.pad(np.asarray(x[:192], np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(xs[:, i:i + 8, j:j + 8, :] @ k0[i, j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(recal["batch_stats"]["bn_0"]["mean"], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert r["accuracy_before_finetune"] == common.accuracy(small_model, recal, xt, yt)


@pytest.mark.parametrize("bad,match", [({"prune_fraction": 1.0}, "prune_fraction"), ({"criterion": "nope"}, "criterion"),
                                       ({"max_rounds": -1}, "max_rounds"), ({"colour": 1}, "unknown keys")])
def test_bad_config_is_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        filter_prune.run({**BASE, **bad}, tmp_path)
