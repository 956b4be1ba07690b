"""experiments.filter_prune end to end on the embedded digits: exact round count, widths, counts, resume."""
from __future__ import annotations

import csv

import pytest

from experiments import filter_prune
from jaxprune import checkpoint

BASE = dict(dataset="digits", model="vgg", vgg_cfg=["6", "M", "10"], normalize="none", optimizer="momentum",
            lr=0.05, weight_decay=0.0, schedule="constant", milestones=[], training_steps="2ep", batch_size=64,
            finetune_steps="5", finetune_lr=0.01, fraction=0.25, max_pruned_fraction=0.8, max_rounds=3)


def test_round_widths_closed_form():
    orig = {"a": 10, "b": 7}
    assert filter_prune.round_widths(orig, orig, 0.25, 0.9) == {"a": 7, "b": 5}  # ceil(2.5)=3, ceil(1.75)=2
    assert filter_prune.round_widths({"a": 2, "b": 1}, orig, 0.5, 0.9) == {"a": 1, "b": 1}  # floor ceil(0.1·n)
    assert filter_prune.round_widths({"a": 5, "b": 4}, orig, 0.5, 0.5) == {"a": 5, "b": 4}  # already at the floor


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
    trained = checkpoint.read_json(tmp_path / "trained" / "trained.json")
    more = filter_prune.run({**BASE, "max_rounds": 4}, tmp_path)
    assert checkpoint.read_json(tmp_path / "trained" / "trained.json") == trained
    assert more["rounds"][:4] == checkpoint.read_json(tmp_path / "results.json")["rounds"][:4] == rounds
    assert more["rounds"][4]["widths"] == filter_prune.round_widths(widths[3], widths[0], 0.25, 0.8)


def test_stops_at_the_floor_and_refuses_a_changed_config(tmp_path):
    res = filter_prune.run({**BASE, "fraction": 0.5, "max_pruned_fraction": 0.5, "max_rounds": 5,
                            "criterion": "l2_gm"}, tmp_path)
    assert [r["round"] for r in res["rounds"]] == [0, 1] and res["finished"]
    assert res["rounds"][1]["widths"] == {"conv_0": 3, "conv_1": 5}
    with pytest.raises(ValueError, match="different config"):
        filter_prune.run({**BASE, "fraction": 0.5, "max_pruned_fraction": 0.5, "criterion": "l1"}, tmp_path)


def test_data_driven_criterion_through_batchnorm_and_recalibration(tmp_path):
    cfg = {**BASE, "criterion": "taylor", "reference_examples": 32, "max_rounds": 1, "fraction": 0.5,
           "training_steps": "1ep", "bn_recalibration_batches": 3}
    res = filter_prune.run(cfg, tmp_path)
    r = res["rounds"][1]
    assert r["widths"] == {"conv_0": 3, "conv_1": 5}
    assert r["accuracy_before_finetune"] != r["accuracy_after_removal"]  # the statistics were re-estimated


@pytest.mark.parametrize("bad,match", [({"fraction": 1.0}, "fraction"), ({"criterion": "nope"}, "criterion"),
                                       ({"max_rounds": -1}, "max_rounds"), ({"colour": 1}, "unknown keys")])
def test_bad_config_is_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        filter_prune.run({**BASE, **bad}, tmp_path)
